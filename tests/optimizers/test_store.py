"""End to end through kvframe.create('local'): the four ways to set an optimizer, pushes running the
updater, row-sparse pushes, the third-party optimizer from the test plugin package, and (with a GPU)
cupy arrays updated by the same code as numpy."""

import importlib.metadata

import numpy as np
import pytest
from kvframe_optimizers import AdamConfig, create_optimizer

import kvframe
from kvframe import plugins
from kvframe.arrays import RowSparseArray
from kvframe.errors import ConfigError


def _store(value=None, key=0):
    kv = kvframe.create("local")
    kv.init(key, np.ones((4, 3), np.float32) if value is None else value)
    return kv


def _pull(kv, key=0, shape=(4, 3)):
    out = np.empty(shape, np.float32)
    kv.pull(key, out=out)
    return out


def _adam_once(lr):
    # first Adam step: m = 0.1 g, v = 0.001 g^2, lr_t = lr*sqrt(0.001)/0.1 -> w -= lr * g/|g| (eps aside)
    return 1.0 - lr * 1.0 / (1.0 + 1e-8 / np.sqrt(0.001 * 4.0))


@pytest.mark.parametrize("how", ["object", "model", "dict", "name"])
def test_set_optimizer_four_ways(how):
    kv = _store()
    arg = {"object": lambda: (create_optimizer("adam", learning_rate=0.1),),
           "model": lambda: (AdamConfig(learning_rate=0.1),),
           "dict": lambda: ({"type": "adam", "learning_rate": 0.1},),
           "name": lambda: ("Adam",)}[how]()
    kv.set_optimizer(*arg, **({"learning_rate": 0.1} if how == "name" else {}))
    assert kv.optimizer.config.type == "adam" and kv.optimizer.config.learning_rate == 0.1
    kv.push(0, [np.ones((4, 3), np.float32), np.ones((4, 3), np.float32)])  # summed: g = 2
    np.testing.assert_allclose(_pull(kv), _adam_once(0.1), rtol=1e-6)


def test_model_with_keyword_override_is_revalidated():
    kv = _store()
    kv.set_optimizer(AdamConfig(learning_rate=0.1), beta1=0.5)
    assert kv.optimizer.config.beta1 == 0.5
    with pytest.raises(ConfigError, match="beta1"):
        kv.set_optimizer(AdamConfig(), beta1=1.5)


def test_pushes_with_momentum_accumulate_per_key():
    kv = kvframe.create("local")
    kv.init([0, 1], [np.zeros(2, np.float32), np.zeros(2, np.float32)])
    kv.set_optimizer("sgd", learning_rate=0.1, momentum=0.5)
    for _ in range(3):
        kv.push(0, np.ones(2, np.float32))
    kv.push(1, np.ones(2, np.float32))
    # key 0: mom -0.1, -0.15, -0.175 -> w = -0.425; key 1: one step
    np.testing.assert_allclose(_pull(kv, 0, (2,)), -0.425, rtol=1e-6)
    np.testing.assert_allclose(_pull(kv, 1, (2,)), -0.1, rtol=1e-6)
    assert kv.optimizer.num_update == 3


def test_row_sparse_push_updates_lazily_through_the_store():
    kv = _store(np.ones((5, 2), np.float32))
    kv.set_optimizer("sgd", learning_rate=0.5, wd=0.1, momentum=0.9)
    kv.push(0, [RowSparseArray(np.ones((1, 2), np.float32), [3], (5, 2)),
                RowSparseArray(np.ones((2, 2), np.float32), [1, 3], (5, 2))])
    out = _pull(kv, shape=(5, 2))
    # rows 1 (g=1) and 3 (g=2) move: w = 1 - 0.5*(g + 0.1); the others keep 1 (no weight decay)
    np.testing.assert_allclose(out[[0, 2, 4]], 1.0)
    np.testing.assert_allclose(out[1], 1 - 0.5 * 1.1, rtol=1e-6)
    np.testing.assert_allclose(out[3], 1 - 0.5 * 2.1, rtol=1e-6)


def test_updater_can_be_set_directly():
    kv = _store()
    upd = create_optimizer("test", rescale_grad=2.0).create_updater()
    kv.set_updater(upd)
    kv.push(0, np.ones((4, 3), np.float32))
    np.testing.assert_allclose(_pull(kv), 3.0)
    np.testing.assert_allclose(upd.states[0].arrays["weight_copy"], 3.0)


def test_listing_optimizers_needs_no_import_and_names_every_rule():
    names = plugins.names("optimizers")
    assert {"sgd", "adam", "lamb", "lans", "adamw", "adabelief", "ccsgd", "groupadagrad", "test"} <= set(names)
    eps = {ep.name for ep in importlib.metadata.entry_points(group="kvframe.optimizers")
           if ep.value == "kvframe_optimizers"}
    from kvframe_optimizers import RULES

    assert eps == set(RULES)  # one entry point per registered name


def test_third_party_optimizer_from_the_test_plugin_validates_and_runs():
    kv = _store()
    kv.set_optimizer("halfsign", learning_rate=0.25)
    reg = plugins.lookup("optimizers", "halfsign")
    assert reg.distribution == "kvframe-testplugin"
    kv.push(0, np.full((4, 3), -3.0, np.float32))
    np.testing.assert_allclose(_pull(kv), 1.25)
    with pytest.raises(ConfigError, match="learning_rate"):
        kv.set_optimizer({"type": "halfsign", "learning_rate": 0})
    with pytest.raises(ConfigError, match="momentum"):
        kv.set_optimizer("halfsign", momentum=0.9)


def test_third_party_optimizer_states_round_trip(tmp_path):
    kv = _store()
    kv.set_optimizer({"type": "halfsign"})
    kv.push(0, np.ones((4, 3), np.float32))
    kv.save_optimizer_states(tmp_path / "s.npz")
    kv2 = _store()
    kv2.set_optimizer("halfsign")
    kv2.load_optimizer_states(tmp_path / "s.npz")
    assert kv2.backend._updater.steps == {0: 1}


@pytest.mark.gpu
def test_cupy_and_numpy_run_the_same_code():
    import cupy

    rs = np.random.default_rng(0)
    shape = (300, 70)
    w0 = rs.standard_normal(shape).astype(np.float32)
    grads = [rs.standard_normal(shape).astype(np.float32) for _ in range(3)]
    for name, cfg in [("sgd", {"momentum": 0.9, "wd": 0.01}), ("adam", {"wd": 0.01}), ("lamb", {}),
                      ("lars", {"momentum": 0.9}), ("ftrl", {}), ("rmsprop", {"centered": True}), ("nadam", {}),
                      ("lans", {}), ("groupadagrad", {}), ("nag", {"momentum": 0.9})]:
        up_np = create_optimizer(name, **cfg).create_updater()
        up_cp = create_optimizer(name, **cfg).create_updater()
        w_np, w_cp = w0.copy(), cupy.asarray(w0)
        for g in grads:
            up_np(0, g, w_np)
            up_cp(0, cupy.asarray(g), w_cp)
        assert all(isinstance(a, cupy.ndarray) for a in up_cp.states[0].arrays.values())
        np.testing.assert_allclose(cupy.asnumpy(w_cp), w_np, rtol=1e-5, atol=1e-6, err_msg=name)
        rows = np.array([2, 7, 100])
        sg = RowSparseArray(cupy.asarray(grads[0][rows]), cupy.asarray(rows), shape)
        up_cp(0, sg, w_cp)
        up_np(0, RowSparseArray(grads[0][rows], rows, shape), w_np)
        np.testing.assert_allclose(cupy.asnumpy(w_cp), w_np, rtol=1e-5, atol=1e-6, err_msg=name + " sparse")
        # states saved from cupy load into a numpy run
        back = create_optimizer(name, **cfg).create_updater()
        back.set_states(up_cp.get_states())
        np.testing.assert_array_equal(back.states[0].arrays[next(iter(back.states[0].arrays))],
                                      cupy.asnumpy(up_cp.states[0].arrays[next(iter(up_cp.states[0].arrays))]))
