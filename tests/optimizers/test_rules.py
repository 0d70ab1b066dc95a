"""Every optimizer, several steps on random float32 data, against the independent float64 reference
of its published formula (optref.py), through the updater a store calls."""

import warnings

import numpy as np
import pytest
from kvframe_optimizers import RULES, create_optimizer
from optref import reference

FACTOR = {"type": "factor", "step": 2, "factor": 0.5}

CASES = [
    ("sgd", {"learning_rate": 0.1}),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "rescale_grad": 0.5, "clip_gradient": 0.3}),
    ("sgd", {"momentum": 0.5, "lr_scheduler": {**FACTOR, "base_lr": 0.2}, "begin_num_update": 3}),
    ("ccsgd", {"learning_rate": 0.05, "momentum": 0.9, "wd": 0.01}),
    ("nag", {"learning_rate": 0.1, "wd": 0.01}),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.05, "clip_gradient": 0.5, "rescale_grad": 0.7}),
    ("signum", {}),
    ("signum", {"momentum": 0.0, "wd": 0.01}),
    ("signum", {"wd": 0.01, "wd_lh": 0.02, "clip_gradient": 0.4}),
    ("ftml", {}),
    ("ftml", {"learning_rate": 0.05, "wd": 0.01, "clip_gradient": 0.5, "beta1": 0.5}),
    ("lars", {"learning_rate": 0.5, "momentum": 0.9, "wd": 0.01}),
    ("lars", {"learning_rate": 0.5, "eta": 0.01, "eps": 1e-3}),
    ("lars", {"momentum": 0.9, "lr_scheduler": {**FACTOR, "base_lr": 1.0}, "clip_gradient": 0.5}),
    ("lars", {"momentum": 0.9, "momentum_correction": False, "lr_scheduler": {**FACTOR, "base_lr": 1.0}}),
    ("lbsgd", {"learning_rate": 0.1, "momentum": 0.9}),
    ("lbsgd", {"learning_rate": 0.1, "momentum": 0.9, "batch_scale": 2, "warmup_epochs": 1, "updates_per_epoch": 4}),
    ("lbsgd", {"learning_rate": 0.1, "batch_scale": 3, "warmup_strategy": "sqrt", "warmup_epochs": 2,
               "updates_per_epoch": 3, "wd": 0.01}),
    ("lbsgd", {"learning_rate": 0.1, "batch_scale": 2, "warmup_strategy": "power2", "warmup_epochs": 2,
               "updates_per_epoch": 2, "begin_epoch": 1}),
    ("lbsgd", {"learning_rate": 0.1, "momentum": 0.5, "batch_scale": 2, "warmup_strategy": "lars", "wd": 0.01}),
    ("lbsgd", {"momentum": 0.5, "lr_scheduler": {**FACTOR, "base_lr": 0.2}}),
    ("lamb", {}),
    ("lamb", {"wd": 0.01, "bias_correction": False, "lower_bound": 0.5, "upper_bound": 2.0}),
    ("lamb", {"clip_gradient": 0.5, "rescale_grad": 0.7, "upper_bound": 1.0}),
    ("dcasgd", {"learning_rate": 0.1}),
    ("dcasgd", {"learning_rate": 0.1, "momentum": 0.9, "lamda": 0.1, "wd": 0.01, "clip_gradient": 0.5}),
    ("adam", {}),
    ("adam", {"learning_rate": 0.1, "wd": 0.05, "clip_gradient": 0.5, "rescale_grad": 0.7, "beta1": 0.8}),
    ("adagrad", {"learning_rate": 0.1}),
    ("adagrad", {"learning_rate": 0.1, "wd": 0.01, "clip_gradient": 0.5, "eps": 1e-3}),
    ("rmsprop", {}),
    ("rmsprop", {"learning_rate": 0.01, "centered": True, "clip_weights": 1.5, "wd": 0.01, "gamma1": 0.95}),
    ("rmsprop", {"learning_rate": 0.05, "clip_weights": 0.8, "clip_gradient": 0.5}),
    ("adadelta", {}),
    ("adadelta", {"rho": 0.95, "wd": 0.01, "clip_gradient": 0.5, "epsilon": 1e-4}),
    ("ftrl", {}),
    ("ftrl", {"lamda1": 0.05, "beta": 0.5, "wd": 0.01, "clip_gradient": 0.5, "rescale_grad": 0.7}),
    ("adamax", {}),
    ("adamax", {"wd": 0.01, "clip_gradient": 0.5, "beta2": 0.9}),
    ("nadam", {}),
    ("nadam", {"wd": 0.01, "schedule_decay": 0.01, "clip_gradient": 0.5}),
    ("groupadagrad", {"learning_rate": 0.1}),
    ("groupadagrad", {"learning_rate": 0.1, "clip_gradient": 0.5, "eps": 1e-3}),
    ("test", {"rescale_grad": 0.5}),
    ("adamw", {}),
    ("adamw", {"wd": 0.01, "correct_bias": False, "clip_gradient": 0.5, "learning_rate": 0.01}),
    ("adabelief", {}),
    ("adabelief", {"wd": 0.01, "clip_gradient": 0.5, "correct_bias": False}),
    ("lans", {}),
    ("lans", {"wd": 0.01, "lower_bound": 0.5, "upper_bound": 2.0, "clip_gradient": 0.05, "learning_rate": 0.01}),
]


def _data(seed, shape=(6, 5), steps=5):
    rs = np.random.default_rng(seed)
    w0 = rs.standard_normal(shape).astype(np.float32)
    grads = [rs.standard_normal(shape).astype(np.float32) for _ in range(steps)]
    return w0, grads


def _run(name, cfg, w0, grads, key=0):
    upd = create_optimizer(name, **cfg).create_updater()
    w = w0.copy()
    out = []
    for g in grads:
        upd(key, g.copy(), w)
        out.append(w.astype(np.float64))
    return out


def _close(got, ref, what, tol=5e-5):
    err = np.max(np.abs(got - ref)) / max(1e-3, np.max(np.abs(ref)))
    assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_against_reference(name, cfg):
    w0, grads = _data(hash(name) % 1000)
    got = _run(name, cfg, w0, grads)
    ref = reference(name, cfg, w0, grads)
    for i, (a, b) in enumerate(zip(got, ref)):
        _close(a, b, f"{name} {cfg} step {i + 1}")
    # the weights moved (a reference that agrees with a no-op would prove nothing)
    assert not np.allclose(got[-1], w0)


def test_every_registered_optimizer_has_a_case():
    assert set(RULES) == {n for n, _ in CASES} | {"sgld"}


def test_sgld_with_seeded_noise():
    cfg = {"learning_rate": 0.01, "wd": 0.01, "seed": 7, "clip_gradient": 1.0}
    w0, grads = _data(5)
    rng = np.random.default_rng(7)  # kvframe draws N(0, 1) of the weight's shape per step, scaled by sqrt(lr)
    noise = [rng.standard_normal(w0.shape) for _ in grads]
    ref = reference("sgld", cfg, w0, grads, noise)
    got = _run("sgld", cfg, w0, grads)
    for a, b in zip(got, ref):
        _close(a, b, "sgld")


def test_sgld_noise_has_variance_lr():
    lr = 0.04
    upd = create_optimizer("sgld", learning_rate=lr, seed=1).create_updater()
    w = np.zeros(200_000, np.float32)
    upd(0, np.zeros_like(w), w)
    assert abs(w.mean()) < 0.003 and abs(w.var() / lr - 1) < 0.02


def test_float64_weights_match_reference_tightly():
    w0, grads = _data(3)
    w0, grads = w0.astype(np.float64), [g.astype(np.float64) for g in grads]
    for name, cfg in [("adam", {"wd": 0.01}), ("lamb", {"wd": 0.01}), ("ftrl", {}), ("nadam", {})]:
        got = _run(name, cfg, w0, grads)
        ref = reference(name, cfg, w0, grads)
        _close(got[-1], ref[-1], name, tol=1e-12)


def test_large_arrays_run_blocked_and_threaded_like_small_ones():
    """An array over the engine's threshold is cut into blocks and shared by threads; the results
    must equal a reference (norm-based lamb/lans/lars included)."""
    rs = np.random.default_rng(0)
    n = (1 << 18) + 1234
    w0 = rs.standard_normal(n).astype(np.float32)
    grads = [rs.standard_normal(n).astype(np.float32) for _ in range(2)]
    for name, cfg in [("adam", {"wd": 0.01}), ("lamb", {"wd": 0.01}), ("lars", {"momentum": 0.9, "learning_rate": 1}),
                      ("sgd", {"momentum": 0.9, "wd": 0.01}), ("lans", {})]:
        got = _run(name, cfg, w0, grads)
        ref = reference(name, cfg, w0, grads)
        _close(got[-1], ref[-1], name, tol=1e-5)


def test_per_key_lr_mult_and_wd_mult_and_names():
    """lr_mult/wd_mult by key or by name; with param_idx2name, names ending in neither _weight nor
    _gamma get no weight decay (unless a wd_mult says otherwise)."""
    cfg = {"learning_rate": 0.1, "wd": 0.1, "param_idx2name": {0: "fc_weight", 1: "fc_bias", 2: "bn_gamma",
                                                               3: "bn_beta", 4: "emb_bias"},
           "lr_mult": {0: 2.0, "bn_gamma": 0.5}, "wd_mult": {"emb_bias": 3.0}}
    upd = create_optimizer("sgd", **cfg).create_updater()
    w0 = np.ones(4, np.float32)
    g = np.full(4, 0.5, np.float32)
    expect = {  # (lr, wd) per key
        0: (0.2, 0.1), 1: (0.1, 0.0), 2: (0.05, 0.1), 3: (0.1, 0.0), 4: (0.1, 0.3), 5: (0.1, 0.1)}
    for key, (lr, wd) in expect.items():
        w = w0.copy()
        upd(key, g, w)
        np.testing.assert_allclose(w, (1 - lr * wd) * 1.0 - lr * 0.5, rtol=1e-6, err_msg=f"key {key}")


def test_string_keys_use_mults_by_key():
    upd = create_optimizer("sgd", learning_rate=0.1, wd=0.5, lr_mult={"a": 3.0}, wd_mult={"a": 0.0}).create_updater()
    w = np.ones(3, np.float32)
    upd("a", np.ones(3, np.float32), w)
    np.testing.assert_allclose(w, 1 - 0.3, rtol=1e-6)
    w = np.ones(3, np.float32)
    upd("b", np.ones(3, np.float32), w)
    np.testing.assert_allclose(w, (1 - 0.05) - 0.1, rtol=1e-6)


def test_lars_skips_gamma_beta_bias_and_decays_only_weight_names():
    cfg = {"learning_rate": 0.5, "wd": 0.1, "param_idx2name": {0: "fc_weight", 1: "fc_bias", 2: "bn_gamma"}}
    opt = create_optimizer("lars", **cfg)
    upd = opt.create_updater()
    w0, (g, *_) = _data(1, shape=(8,))
    for key in (1, 2):  # no LARS scaling and no weight decay (gamma too, unlike the base rule)
        w = w0.copy()
        upd(key, g, w)
        np.testing.assert_allclose(w, w0 - 0.5 * g, rtol=1e-5, atol=1e-6)
    w = w0.copy()
    upd(0, g, w)
    wn, gn = np.linalg.norm(w0.astype(np.float64)), np.linalg.norm(g.astype(np.float64))
    lr = 0.5 * 0.001 * wn / (gn + 0.1 * wn)
    np.testing.assert_allclose(w, (1 - lr * 0.1) * w0 - lr * g, rtol=1e-5)


def test_ftml_and_ftrl_hold_still_at_zero_learning_rate():
    for name in ("ftml", "ftrl"):
        upd = create_optimizer(name, learning_rate=0.0).create_updater()
        w0, (g, *_) = _data(2)
        w = w0.copy()
        upd(0, g, w)
        np.testing.assert_array_equal(w, w0)


def test_learning_rate_property_and_set_learning_rate():
    opt = create_optimizer("sgd", learning_rate=0.3)
    assert opt.learning_rate == 0.3
    opt.set_learning_rate(0.2)
    assert opt.learning_rate == 0.2 and opt.config.learning_rate == 0.2
    sched = create_optimizer("sgd", lr_scheduler={"type": "factor", "step": 1, "factor": 0.5, "base_lr": 1.0})
    assert sched.learning_rate == 1.0  # no learning_rate: the scheduler's base_lr
    with pytest.raises(ValueError, match="lr_scheduler"):
        sched.set_learning_rate(0.1)
    assert create_optimizer("sgd").learning_rate == 0.01  # MXNet's default without lr or scheduler


def test_float16_without_multi_precision_warns_and_updates_in_float16():
    upd = create_optimizer("sgd", learning_rate=0.1, momentum=0.9).create_updater()
    w = np.ones(4, np.float16)
    with pytest.warns(UserWarning, match="multi_precision"):
        upd(0, np.ones(4, np.float16), w)
    assert upd.states[0].arrays["mom"].dtype == np.float16
    np.testing.assert_allclose(w, 0.9, rtol=1e-3)


def test_gradient_of_another_shape_is_refused():
    from kvframe.errors import ShapeMismatchError

    upd = create_optimizer("adam").create_updater()
    w = np.ones((3, 2), np.float32)
    upd(0, np.ones((3, 2), np.float32), w)
    with pytest.raises(ShapeMismatchError, match="key 0"):
        upd(0, np.ones((2, 3), np.float32), w)
    with pytest.raises(ShapeMismatchError, match="key 0"):
        upd(0, np.ones((4, 2), np.float32), np.ones((4, 2), np.float32))


def test_groupadagrad_needs_two_dimensions():
    upd = create_optimizer("groupadagrad").create_updater()
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        with warnings.catch_warnings():
            upd(0, np.ones(3, np.float32), np.ones(3, np.float32))


@pytest.mark.parametrize("name", sorted(RULES))
def test_pushed_gradient_is_left_untouched(name):
    """A store hands the caller's pushed array to the updater; it may be reused after push."""
    cfg = {"lbsgd": {"batch_scale": 2}, "sgd": {"momentum": 0.9}}.get(name, {})
    upd = create_optimizer(name, **cfg).create_updater()
    w0, grads = _data(8)
    w = w0.copy()
    for g in grads[:3]:
        keep = g.copy()
        upd(0, g, w)
        np.testing.assert_array_equal(g, keep)
