"""Row-sparse gradients (lazy updates touch only the rows present; the dense path otherwise) and
multi-precision (float16 weights updated through a float32 master copy)."""

import warnings

import numpy as np
import pytest
from kvframe_optimizers import create_optimizer
from optref import reference

from kvframe.arrays import RowSparseArray

ROWS = [[0, 3], [1, 3, 6], [6], [], [2, 3]]
SHAPE = (8, 4)


def _data(seed=0):
    rs = np.random.default_rng(seed)
    w0 = rs.standard_normal(SHAPE).astype(np.float32)
    grads = [rs.standard_normal(SHAPE).astype(np.float32) for _ in ROWS]
    return w0, grads


def _sparse(g, rows):
    rows = np.array(rows, dtype=np.int64)
    return RowSparseArray(g[rows], rows, SHAPE)


def _lazy_reference(name, cfg, w0, grads):
    """Each row runs the dense rule over only the steps where it is present, with its own states
    (and, like MXNet, the key's update count t of the step it is updated at)."""
    w = w0.astype(np.float64).copy()
    states = {r: {} for r in range(SHAPE[0])}
    from optref import DEFAULT_LR, STEP, sched_lr

    lr_cfg = dict(cfg)
    if name in DEFAULT_LR and "learning_rate" not in cfg:
        lr_cfg["learning_rate"] = DEFAULT_LR[name]
    for i, (g, rows) in enumerate(zip(grads, ROWS)):
        t = i + 1
        lr = sched_lr(lr_cfg, t)
        for r in rows:
            w[r:r + 1] = STEP[name](w[r:r + 1], g[r:r + 1].astype(np.float64), states[r], lr_cfg, t, lr,
                                    cfg.get("wd", 0.0), cfg.get("rescale_grad", 1.0), cfg.get("clip_gradient"), None)
    return w


LAZY = [
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.05}),
    ("sgd", {"learning_rate": 0.1, "wd": 0.05, "clip_gradient": 0.5}),
    ("adam", {"learning_rate": 0.1, "wd": 0.05, "rescale_grad": 0.5}),
    ("adagrad", {"learning_rate": 0.1, "wd": 0.01}),
    ("ftrl", {"wd": 0.01}),
    ("groupadagrad", {"learning_rate": 0.1, "clip_gradient": 0.7}),
]


@pytest.mark.parametrize("name,cfg", LAZY, ids=[n for n, _ in LAZY])
def test_lazy_update_touches_only_present_rows(name, cfg):
    w0, grads = _data(1)
    upd = create_optimizer(name, **cfg).create_updater()
    w = w0.copy()
    for g, rows in zip(grads, ROWS):
        upd(0, _sparse(g, rows), w)
    ref = _lazy_reference(name, cfg, w0, grads)
    np.testing.assert_allclose(w, ref, rtol=2e-5, atol=2e-6)
    never = [r for r in range(SHAPE[0]) if not any(r in rows for rows in ROWS)]
    np.testing.assert_array_equal(w[never], w0[never])  # untouched rows: not even weight decay
    for arr in upd.states[0].arrays.values():  # and their states stay zero
        assert not np.any(arr[never])


def test_lars_lazy_uses_whole_weight_norm():
    cfg = {"learning_rate": 0.5, "momentum": 0.9, "wd": 0.01}
    w0, grads = _data(2)
    upd = create_optimizer("lars", **cfg).create_updater()
    w = w0.copy()
    g, rows = grads[0], ROWS[0]
    upd(0, _sparse(g, rows), w)
    wn = np.linalg.norm(w0.astype(np.float64))
    gn = np.linalg.norm(g[rows].astype(np.float64))
    lr = 0.5 * 0.001 * wn / (gn + 0.01 * wn)
    expect = w0.astype(np.float64).copy()
    expect[rows] = w0[rows] - lr * (g[rows] + 0.01 * w0[rows])
    np.testing.assert_allclose(w, expect, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,cfg", [
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.05, "lazy_update": False}),
    ("adam", {"learning_rate": 0.1, "wd": 0.05, "lazy_update": False}),
    ("lars", {"learning_rate": 0.5, "momentum": 0.9, "lazy_update": False}),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.05}),  # no lazy form: always dense
    ("rmsprop", {"learning_rate": 0.01}),
])
def test_dense_path_equals_update_with_densified_gradient(name, cfg):
    w0, grads = _data(3)
    sparse_w, dense_w = w0.copy(), w0.copy()
    up_s = create_optimizer(name, **cfg).create_updater()
    up_d = create_optimizer(name, **cfg).create_updater()
    for g, rows in zip(grads, ROWS):
        sg = _sparse(g, rows)
        up_s(0, sg, sparse_w)
        up_d(0, sg.todense(), dense_w)
    np.testing.assert_array_equal(sparse_w, dense_w)
    ref = reference(name, cfg, w0, [_sparse(g, r).todense() for g, r in zip(grads, ROWS)])[-1]
    np.testing.assert_allclose(sparse_w, ref, rtol=2e-5, atol=2e-6)
    never = [r for r in range(SHAPE[0]) if not any(r in rows for rows in ROWS)]
    if cfg.get("wd"):
        assert not np.allclose(sparse_w[never], w0[never])  # weight decay reached untouched rows


def test_sgd_lazy_versus_dense_as_mxnet_documents():
    """MXNet (verified there): with weight decay, untouched rows stay put under lazy_update and decay
    without it."""
    g = RowSparseArray(np.zeros((1, 2), np.float32), [0], (3, 2))
    for lazy, expect_row1 in ((True, 1.0), (False, 0.95)):
        w = np.ones((3, 2), np.float32)
        create_optimizer("sgd", learning_rate=0.5, wd=0.1, lazy_update=lazy).create_updater()(0, g, w)
        np.testing.assert_allclose(w[1], expect_row1, rtol=1e-6)
        np.testing.assert_allclose(w[0], 0.95, rtol=1e-6)


# multi-precision ---------------------------------------------------------------------------------

MP = [("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}), ("adam", {"learning_rate": 0.01}),
      ("lamb", {"wd": 0.01}), ("nag", {"momentum": 0.9, "learning_rate": 0.1}), ("rmsprop", {"centered": True}),
      ("lans", {}), ("adamw", {"wd": 0.1})]


@pytest.mark.parametrize("name,cfg", MP, ids=[n for n, _ in MP])
def test_multi_precision_runs_the_float32_update_on_a_master_copy(name, cfg):
    w0, grads = _data(4)
    w16 = w0.astype(np.float16)
    g16 = [g.astype(np.float16) for g in grads]
    up16 = create_optimizer(name, multi_precision=True, **cfg).create_updater()
    up32 = create_optimizer(name, **cfg).create_updater()
    w32 = w16.astype(np.float32)
    w = w16.copy()
    for g in g16:
        up16(0, g, w)
        up32(0, g.astype(np.float32), w32)
        master = up16.states[0].arrays["weight32"]
        assert master.dtype == np.float32
        np.testing.assert_allclose(master, w32, rtol=1e-6, atol=1e-7)  # the float32 trajectory
        np.testing.assert_array_equal(w, master.astype(np.float16))  # the weight is its rounding
    for n, arr in up16.states[0].arrays.items():
        assert arr.dtype == np.float32, n
    ref = reference(name, cfg, w16.astype(np.float32), [g.astype(np.float32) for g in g16])[-1]
    np.testing.assert_allclose(up16.states[0].arrays["weight32"], ref, rtol=1e-4, atol=1e-5)


def test_multi_precision_keeps_small_steps_float16_alone_would_lose():
    w = np.ones(8, np.float16)
    g = np.full(8, 1e-4, np.float16)
    mp = create_optimizer("sgd", learning_rate=1.0, multi_precision=True).create_updater()
    plain = create_optimizer("sgd", learning_rate=1.0).create_updater()
    w_plain = w.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(100):
            mp(0, g, w)
            plain(0, g, w_plain)
    np.testing.assert_allclose(w.astype(np.float32), 0.99, atol=1e-3)  # 100 steps of 1e-4 add up
    np.testing.assert_array_equal(w_plain, 1.0)  # 1 - 1e-4 rounds back to 1 in float16


def test_multi_precision_ignores_float32_weights():
    upd = create_optimizer("adam", multi_precision=True).create_updater()
    w = np.ones(4, np.float32)
    upd(0, np.ones(4, np.float32), w)
    assert "weight32" not in upd.states[0].arrays


def test_multi_precision_with_row_sparse_gradient():
    w0, grads = _data(5)
    w = w0.astype(np.float16)
    upd = create_optimizer("adam", multi_precision=True, learning_rate=0.1).create_updater()
    for g, rows in zip(grads, ROWS):
        upd(0, _sparse(g.astype(np.float16), rows), w)
    master = upd.states[0].arrays["weight32"]
    np.testing.assert_array_equal(w, master.astype(np.float16))
    ref = _lazy_reference("adam", {"learning_rate": 0.1}, w0.astype(np.float16).astype(np.float32),
                          [g.astype(np.float16) for g in grads])
    np.testing.assert_allclose(master, ref, rtol=1e-4, atol=1e-5)
