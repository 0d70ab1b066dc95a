"""kvframe.reduce's compiled one-pass sum (numba, optional) against its numpy blocked adds: the same
additions in the same order, so the same bits; and the numpy path where numba is missing."""

import importlib
import sys

import numpy as np
import pytest

import kvframe
import kvframe.kernels
from kvframe import reduce as R
from kvframe.reduce import Reducer

SIZES = [1, 1000, (1 << 12) + 1, (1 << 16) + 3, (1 << 20) + 7]


@pytest.fixture
def compiled_ran(monkeypatch):
    """The number of compiled sums that ran (skips without numba)."""
    pytest.importorskip("numba")
    mod = importlib.import_module(R.COMPILED)  # whatever KVFRAME_KERNELS says
    assert mod is not None
    ran = []
    real = mod.prepare

    def prepare(out, values, accumulate):
        call = real(out, values, accumulate)
        if call is not None:
            ran.append(len(values))
        return call

    monkeypatch.setattr(mod, "prepare", prepare)
    return ran


def _both(monkeypatch, fn):
    out = {}
    for path in ("numba", "numpy"):
        monkeypatch.setenv("KVFRAME_KERNELS", path)
        assert R.kernel_backend() == path
        out[path] = fn()
    return out["numba"], out["numpy"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("copies", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", SIZES)
def test_sum_and_add_match_numpy_bit_for_bit(monkeypatch, compiled_ran, n, copies, dtype):
    rs = np.random.default_rng(n + copies)
    vals = [(rs.standard_normal(n) * 10.0 ** rs.integers(-3, 4)).astype(dtype) for _ in range(copies)]
    base = rs.standard_normal(n).astype(dtype)
    red = Reducer(threads=2, bigarray_bound=1 << 14)

    def sums():
        out = np.empty(n, dtype)
        red.sum_into(out, vals)
        acc = base.copy()
        red.add_into(acc, vals)
        first = vals[0].copy()  # out as values[0]
        red.sum_into(first, [first, *vals[1:]])
        return out, acc, first

    fast, slow = _both(monkeypatch, sums)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fast[0], np.sum(np.array(vals, np.float64), axis=0), rtol=1e-5, atol=1e-4)
    assert len(compiled_ran) == (3 if n >= R.COMPILED_MIN else 0)


def test_shapes_readonly_and_fallbacks(monkeypatch, compiled_ran):
    rs = np.random.default_rng(3)
    shape = (300, 70)
    vals = [rs.standard_normal(shape).astype(np.float32) for _ in range(4)]
    vals[1].flags.writeable = False  # a received buffer
    red = Reducer()

    def run(values, dtype=np.float32):
        out = np.empty(shape, dtype)
        red.sum_into(out, values)
        return out

    fast, slow = _both(monkeypatch, lambda: run(vals))
    np.testing.assert_array_equal(fast, slow)
    assert compiled_ran == [4]
    # mixed read-only flags with more than four inputs (a tuple of one array type)
    many = vals + [rs.standard_normal(shape).astype(np.float32) for _ in range(3)]
    fast, slow = _both(monkeypatch, lambda: run(many))
    np.testing.assert_array_equal(fast, slow)
    # strided inputs and float16 take the numpy path, on both settings
    compiled_ran.clear()
    strided = [v[:, ::2] for v in vals]
    out = np.empty((300, 35), np.float32)
    monkeypatch.setenv("KVFRAME_KERNELS", "numba")
    red.sum_into(out, strided)
    np.testing.assert_array_equal(out, ((strided[0] + strided[1]) + strided[2]) + strided[3])
    half = [v.astype(np.float16) for v in vals]
    out16 = np.empty(shape, np.float16)
    red.sum_into(out16, half)
    np.testing.assert_array_equal(out16, ((half[0] + half[1]) + half[2]) + half[3])
    assert compiled_ran == []


def test_local_store_push_pull_same_on_both_paths(monkeypatch, compiled_ran):
    rs = np.random.default_rng(8)
    n = (1 << 18) + 5
    vals = [rs.standard_normal(n).astype(np.float32) for _ in range(4)]

    def pushpull():
        kv = kvframe.create("local")
        kv.init(0, np.zeros(n, np.float32))
        out = np.empty(n, np.float32)
        kv.push(0, vals)
        kv.pull(0, out=out)
        kv.close()
        return out

    fast, slow = _both(monkeypatch, pushpull)
    np.testing.assert_array_equal(fast, slow)
    assert compiled_ran


def test_backend_switch_and_missing_numba(monkeypatch):
    monkeypatch.setenv("KVFRAME_KERNELS", "fortran")
    with pytest.raises(ValueError, match="KVFRAME_KERNELS must be one of"):
        R.kernel_backend()
    monkeypatch.setitem(sys.modules, "numba", None)  # numba cannot be imported
    monkeypatch.delitem(sys.modules, "kvframe._reduce_kernels", raising=False)
    monkeypatch.delattr(kvframe, "_reduce_kernels", raising=False)
    monkeypatch.setattr(kvframe.kernels, "_modules", {})
    monkeypatch.setenv("KVFRAME_KERNELS", "numba")
    with pytest.raises(ImportError, match="KVFRAME_KERNELS=numba"):
        R.kernel_backend()
    monkeypatch.delenv("KVFRAME_KERNELS")
    assert R.kernel_backend() == "numpy"
    vals = [np.full(1 << 16, float(i), np.float32) for i in range(4)]
    out = np.empty(1 << 16, np.float32)
    Reducer().sum_into(out, vals)
    assert (out == 6.0).all()
