"""The compiled (numba) optimizer steps against the numpy kernels and the float64 reference.

``KVFRAME_KERNELS`` forces each path.  The compiled steps repeat the numpy kernels' float32
operations in the same order, so weights and states agree bit for bit, except lamb, whose norms are
summed in float64 by the compiled step (float32 BLAS blocks on the numpy path): there the weights
agree to 1e-6 relative.  Both paths agree with optref's float64 formulas to 5e-5 relative (the
tolerance of test_rules.py).
"""

import importlib
import sys

import kvframe_optimizers
import numpy as np
import pytest
from kvframe_optimizers import create_optimizer, engine, kernel_backend
from optref import reference

import kvframe.kernels
from kvframe.arrays import RowSparseArray

SIZES = [1, 1000, (1 << 16) + 3, (1 << 18) + 7]
STEPS = 3

CASES = [
    ("sgd", {"learning_rate": 0.1}),
    ("sgd", {"learning_rate": 0.1, "wd": 0.01, "rescale_grad": 0.5, "clip_gradient": 0.3}),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9}),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "rescale_grad": 0.5, "clip_gradient": 0.3}),
    ("nag", {"learning_rate": 0.1, "wd": 0.01}),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9}),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.05, "clip_gradient": 0.5, "rescale_grad": 0.7}),
    ("lars", {"learning_rate": 0.5, "momentum": 0.9, "wd": 0.01}),
    ("lbsgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}),
    ("adam", {}),
    ("adam", {"learning_rate": 0.1, "wd": 0.05, "clip_gradient": 0.5, "rescale_grad": 0.7, "beta1": 0.8}),
    ("adamw", {"wd": 0.01}),
    ("adamw", {"wd": 0.01, "correct_bias": False, "clip_gradient": 0.5, "rescale_grad": 0.7, "learning_rate": 0.01}),
    ("lamb", {}),
    ("lamb", {"wd": 0.01, "bias_correction": False, "lower_bound": 0.5, "upper_bound": 2.0}),
    ("lamb", {"clip_gradient": 0.5, "rescale_grad": 0.7, "upper_bound": 1.0, "wd": 0.01}),
]
EXACT = {"sgd", "nag", "lars", "lbsgd", "adam", "adamw"}  # bit-identical to the numpy path


@pytest.fixture
def numba_kernels():
    """The compiled kernels module; skips where numba cannot be imported."""
    pytest.importorskip("numba")
    mod = importlib.import_module(engine.COMPILED)  # whatever KVFRAME_KERNELS says
    assert mod is not None
    return mod


@pytest.fixture
def count_compiled(monkeypatch, numba_kernels):
    """Records the compiled steps that ran (name), so a test knows the numba path was taken."""
    ran = []
    real = numba_kernels.prepare

    def prepare(name, p, arrays):
        call = real(name, p, arrays)
        if call is not None:
            ran.append(name)
        return call

    monkeypatch.setattr(numba_kernels, "prepare", prepare)
    return ran


def _data(n, seed, dtype=np.float32, steps=STEPS):
    rs = np.random.default_rng(seed)
    w0 = rs.standard_normal(n).astype(dtype)
    grads = [rs.standard_normal(n).astype(dtype) for _ in range(steps)]
    return w0, grads


def _run(monkeypatch, backend, name, cfg, w0, grads):
    monkeypatch.setenv("KVFRAME_KERNELS", backend)
    assert kernel_backend() == backend
    upd = create_optimizer(name, **cfg).create_updater()
    w = w0.copy()
    out = []
    for g in grads:
        upd(0, g.copy(), w)
        out.append(w.copy())
    return out, {k: a.copy() for k, a in upd.states[0].arrays.items()}


def _rel(got, ref):
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - ref)) / max(1e-3, np.max(np.abs(ref))))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_compiled_matches_numpy_and_reference(monkeypatch, count_compiled, name, cfg, n):
    w0, grads = _data(n, seed=n % 97)
    fast, fast_states = _run(monkeypatch, "numba", name, cfg, w0, grads)
    assert count_compiled, "the compiled step did not run"
    slow, slow_states = _run(monkeypatch, "numpy", name, cfg, w0, grads)
    ref = reference(name, cfg, w0, grads)
    for step, (a, b, r) in enumerate(zip(fast, slow, ref), 1):
        assert a.dtype == np.float32
        if name in EXACT:
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {cfg} step {step}")
        else:
            assert _rel(a, b) < 1e-6, f"{name} {cfg} step {step}: numba vs numpy {_rel(a, b):.2e}"
        assert _rel(a, r) < 5e-5, f"{name} {cfg} step {step}: numba vs float64 reference {_rel(a, r):.2e}"
        assert _rel(b, r) < 5e-5, f"{name} {cfg} step {step}: numpy vs float64 reference {_rel(b, r):.2e}"
    for k in slow_states:
        if name in EXACT:
            np.testing.assert_array_equal(fast_states[k], slow_states[k], err_msg=k)
        else:
            assert _rel(fast_states[k], slow_states[k]) < 1e-6, k
    assert not np.allclose(fast[-1], w0)


@pytest.mark.parametrize("name,cfg", [CASES[3], CASES[6], CASES[10], CASES[12], CASES[15]],
                         ids=["sgd", "nag", "adam", "adamw", "lamb"])
def test_float64_weights(monkeypatch, count_compiled, name, cfg):
    w0, grads = _data((1 << 17) + 5, seed=3, dtype=np.float64)
    fast, _ = _run(monkeypatch, "numba", name, cfg, w0, grads)
    assert count_compiled
    slow, _ = _run(monkeypatch, "numpy", name, cfg, w0, grads)
    ref = reference(name, cfg, w0, grads)
    if name in EXACT:
        np.testing.assert_array_equal(fast[-1], slow[-1])
    assert _rel(fast[-1], ref[-1]) < 1e-12


def test_threads_and_blocks_do_not_change_results(monkeypatch, count_compiled):
    """The compiled step split over 1 or 3 threads gives the same bits (sgd, adam)."""
    w0, grads = _data((1 << 18) + 7, seed=11)
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(engine, "_runner", engine.Runner(threads))
        for name, cfg in (CASES[3], CASES[10]):
            results.append(_run(monkeypatch, "numba", name, cfg, w0, grads)[0][-1])
    np.testing.assert_array_equal(results[0], results[2])
    np.testing.assert_array_equal(results[1], results[3])


def test_lazy_row_sparse_update_same_on_both_paths(monkeypatch, count_compiled):
    rs = np.random.default_rng(5)
    w0 = rs.standard_normal((50, 8)).astype(np.float32)
    rows = [np.array(r, np.int64) for r in ([0, 3, 7], [3, 9, 49], [1])]
    grads = [RowSparseArray(rs.standard_normal((len(r), 8)).astype(np.float32), r, w0.shape) for r in rows]
    for name, cfg in (("sgd", {"momentum": 0.9, "wd": 0.1}), ("adam", {"wd": 0.1, "learning_rate": 0.1})):
        out = []
        for backend in ("numba", "numpy"):
            monkeypatch.setenv("KVFRAME_KERNELS", backend)
            upd = create_optimizer(name, **cfg).create_updater()
            w = w0.copy()
            for g in grads:
                upd(0, g, w)
            out.append(w)
        np.testing.assert_array_equal(out[0], out[1])
        untouched = [r for r in range(50) if r not in {0, 1, 3, 7, 9, 49}]
        np.testing.assert_array_equal(out[0][untouched], w0[untouched])  # lazy: other rows stay
    assert "sgd" in count_compiled and "adam" in count_compiled


def test_float16_multi_precision_and_readonly_gradients(monkeypatch, count_compiled):
    """float16 gradients meet a float32 master copy: not compiled, the numpy kernel runs (same
    result); a read-only gradient is read by the compiled step."""
    w0, grads = _data(1000, seed=2)
    got = []
    for backend in ("numba", "numpy"):
        monkeypatch.setenv("KVFRAME_KERNELS", backend)
        upd = create_optimizer("adam", multi_precision=True, wd=0.01).create_updater()
        w = w0.astype(np.float16)
        for g in grads:
            upd(0, g.astype(np.float16), w)
        got.append((w, upd.states[0].arrays["weight32"].copy()))
    assert count_compiled == []
    np.testing.assert_array_equal(got[0][1], got[1][1])
    np.testing.assert_array_equal(got[0][0], got[1][0])

    ro = [g.copy() for g in grads]
    for g in ro:
        g.flags.writeable = False
    fast, _ = _run(monkeypatch, "numba", "adam", {}, w0, ro)
    assert count_compiled == ["adam"] * STEPS
    slow, _ = _run(monkeypatch, "numpy", "adam", {}, w0, grads)
    np.testing.assert_array_equal(fast[-1], slow[-1])


def test_non_contiguous_weight(monkeypatch, numba_kernels):
    """A strided weight is updated through a contiguous copy (base.py), on both paths alike."""
    rs = np.random.default_rng(9)
    big = rs.standard_normal((300, 40)).astype(np.float32)
    g = rs.standard_normal((300, 20)).astype(np.float32)
    out = []
    for backend in ("numba", "numpy"):
        monkeypatch.setenv("KVFRAME_KERNELS", backend)
        w = big.copy()
        create_optimizer("sgd", momentum=0.9, learning_rate=0.1).create_updater()(0, g, w[:, ::2])
        out.append(w)
    np.testing.assert_array_equal(out[0], out[1])


def test_backend_switch(monkeypatch, numba_kernels):
    monkeypatch.delenv("KVFRAME_KERNELS", raising=False)
    assert kernel_backend() == "numba"  # the default where numba imports
    monkeypatch.setenv("KVFRAME_KERNELS", "numpy")
    assert kernel_backend() == "numpy"
    monkeypatch.setenv("KVFRAME_KERNELS", " Numba ")
    assert kernel_backend() == "numba"
    monkeypatch.setenv("KVFRAME_KERNELS", "fortran")
    with pytest.raises(ValueError, match="KVFRAME_KERNELS must be one of"):
        kernel_backend()


def test_without_numba_the_numpy_path_runs(monkeypatch):
    """numba not importable (simulated): the default is numpy, asking for numba by name is an
    ImportError (as for the codecs), and the updates still match the float64 reference."""
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "kvframe_optimizers._kernels", raising=False)
    monkeypatch.delattr(kvframe_optimizers, "_kernels", raising=False)
    monkeypatch.setattr(kvframe.kernels, "_modules", {})
    monkeypatch.setenv("KVFRAME_KERNELS", "numba")
    with pytest.raises(ImportError, match="KVFRAME_KERNELS=numba"):
        kernel_backend()
    monkeypatch.delenv("KVFRAME_KERNELS", raising=False)
    assert kernel_backend() == "numpy"
    w0, grads = _data((1 << 17) + 9, seed=4)
    for name, cfg in (CASES[3], CASES[10], CASES[15]):
        upd = create_optimizer(name, **cfg).create_updater()
        w = w0.copy()
        for g in grads:
            upd(0, g, w)
        assert _rel(w, reference(name, cfg, w0, grads)[-1]) < 5e-5, name
