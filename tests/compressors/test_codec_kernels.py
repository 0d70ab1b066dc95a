"""The compiled (numba) 2bit/1bit kernels against the numpy path: payload bytes, residual bits and
decoded values equal bit for bit; the one-pass encode_decode_into equals decode(encode()); the
KVFRAME_KERNELS switch.  Tests that need numba skip without it."""

import importlib.util
import sys

import numpy as np
import pytest
from kvframe_compressors import _blocks, _kernels, kernel_backend, set_kernel_backend

import kvframe.kernels
from kvframe.errors import DTypeMismatchError, ShapeMismatchError

SIZES = [0, 1, 15, 16, 17, 1000, (1 << 17) + 3, (1 << 20) + 5]
CODECS = [("2bit", {"threshold": 0.5}), ("2bit", {"threshold": 0.1}), ("2bit", {"threshold": 1.7}),
          ("1bit", {"threshold": -0.5}), ("1bit", {"threshold": 0.0}), ("1bit", {"threshold": 0.5})]


@pytest.fixture
def numba_path():
    pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    _kernels.set_backend(None)


def _bits(a):
    """The bit patterns of a float32 array (NaN payloads and signed zeros included)."""
    return np.ascontiguousarray(a).view(np.uint32)


def _grad(rng, n, t, special):
    g = (rng.standard_normal(n) * max(abs(t), 0.25)).astype(np.float32)
    if n >= 8:
        g[::7] = np.float32(t)  # exactly on the thresholds, before and after the residual
        g[1::7] = -np.float32(t)
        g[2::11] = np.float32(t) / 2
        g[3::13] = -0.0
    if special and n >= 8:
        g[4::101] = np.nan
        g[5::103] = np.inf
        g[6::107] = -np.inf
        g[7::109] = np.float32(3e38)
    return g


def _with_backend(name, fn):
    set_kernel_backend(name)
    try:
        return fn()
    finally:
        set_kernel_backend(None)


@pytest.mark.parametrize("name, options", CODECS)
@pytest.mark.parametrize("n", SIZES)
def test_numba_encode_decode_bit_identical_to_numpy(numba_path, make, name, options, n):
    comp = make(name, **options)
    t = options["threshold"]
    rng = np.random.default_rng(n)
    res = {"numpy": np.zeros(n, np.float32), "numba": np.zeros(n, np.float32)}
    base = (rng.standard_normal(n) * 3).astype(np.float32)
    if n >= 4:
        base[:4] = [-0.0, np.nan, np.inf, 0.0]
    for step in range(3 if n > 1 << 16 else 5):
        g = _grad(rng, n, t, special=step == 2)
        got = {}
        for path in ("numpy", "numba"):
            def run(path=path, g=g):
                payload = comp.encode(g, res[path])
                outs = []
                for acc in (False, True):
                    out = base.copy()
                    comp.decode(payload, out, accumulate=acc)
                    outs.append(out)
                return payload, outs

            got[path] = _with_backend(path, run)
        assert got["numba"][0].dtype == np.uint8
        np.testing.assert_array_equal(got["numba"][0], got["numpy"][0])
        np.testing.assert_array_equal(_bits(res["numba"]), _bits(res["numpy"]))
        for a, b in zip(got["numba"][1], got["numpy"][1]):
            np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # rms of 3e38 values
@pytest.mark.parametrize("name, options", CODECS + [("2bit", {"threshold": 1.0, "threshold_scale": "rms"})])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_encode_decode_into_equals_decode_of_encode(make, name, options, n, path):
    if path == "numba":
        pytest.importorskip("numba")
    comp = make(name, **options)
    t = options["threshold"]
    rng = np.random.default_rng(1000 + n)
    res_ref, res_in, res_np = (np.zeros(n, np.float32) for _ in range(3))
    out_ref = np.full(n, 0.25, np.float32)
    if n >= 2:
        out_ref[:2] = [-0.0, np.nan]
    out_in, out_np = out_ref.copy(), out_ref.copy()
    for step in range(4 if n > 1 << 16 else 6):
        g = _grad(rng, n, t, special=step == 3)
        acc = step % 3 != 0  # assign, then accumulate twice, then assign
        _with_backend("numpy", lambda g=g, acc=acc: comp.decode(comp.encode(g, res_ref), out_ref, accumulate=acc))
        _with_backend("numpy", lambda g=g, acc=acc: comp.encode_decode_into(g, res_np, out_np, acc))

        def fused(g=g, acc=acc):
            assert comp.encode_decode_into(g, res_in, out_in, accumulate=acc) is out_in

        _with_backend(path, fused)
        for a in (res_in, res_np):
            np.testing.assert_array_equal(_bits(a), _bits(res_ref))
        for a in (out_in, out_np):
            np.testing.assert_array_equal(_bits(a), _bits(out_ref))


@pytest.mark.parametrize("name, options", CODECS[::2] + [("2bit", {"threshold": 1.0, "threshold_scale": "rms"})])
@pytest.mark.parametrize("n", [0, 1, 17, 1000, (1 << 17) + 3, (1 << 20) + 5])
@pytest.mark.parametrize("copies", [1, 2, 4])
@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_encode_decode_sum_into_equals_per_copy(make, name, options, n, copies, path):
    if path == "numba":
        pytest.importorskip("numba")
    if n > 1 << 16 and copies == 2:
        pytest.skip("covered by 1 and 4 copies")
    comp = make(name, **options)
    t = options["threshold"]
    rng = np.random.default_rng(copies * 7 + n)
    res_ref = [np.zeros(n, np.float32) for _ in range(copies)]
    res_sum = [np.zeros(n, np.float32) for _ in range(copies)]
    out_ref = np.full(n, -0.0, np.float32)
    out_sum = out_ref.copy()
    for step in range(3):
        grads = [_grad(rng, n, t, special=step == 1 and c == 0) for c in range(copies)]
        acc = step == 2

        def ref(grads=grads, acc=acc):
            for c in range(copies):
                comp.decode(comp.encode(grads[c], res_ref[c]), out_ref, accumulate=acc or c > 0)

        def summed(grads=grads, acc=acc):
            assert comp.encode_decode_sum_into(grads, res_sum, out_sum, accumulate=acc) is out_sum

        with np.errstate(over="ignore"):
            _with_backend("numpy", ref)
            _with_backend(path, summed)
        for a, b in zip(res_sum, res_ref):
            np.testing.assert_array_equal(_bits(a), _bits(b))
        np.testing.assert_array_equal(_bits(out_sum), _bits(out_ref))


@pytest.mark.parametrize("name", ["2bit", "1bit"])
def test_encode_decode_sum_into_mixed_arrays_fall_back(make, name):
    """Read-only or non-contiguous gradients take the per-copy path, with the same results."""
    comp = make(name, threshold=0.25)
    rng = np.random.default_rng(11)
    n = 1001
    base = rng.standard_normal((2, 2 * n)).astype(np.float32)
    ro = rng.standard_normal(n).astype(np.float32)
    ro.flags.writeable = False
    grads = [base[0, ::2], ro, base[1, :n]]
    res_a, res_b = [np.zeros(n, np.float32) for _ in grads], [np.zeros(n, np.float32) for _ in grads]
    out_a, out_b = np.zeros(n, np.float32), np.zeros(n, np.float32)
    comp.encode_decode_sum_into(grads, res_a, out_a)
    for c, g in enumerate(grads):
        comp.decode(comp.encode(g, res_b[c]), out_b, accumulate=c > 0)
    for a, b in zip(res_a, res_b):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    np.testing.assert_array_equal(_bits(out_a), _bits(out_b))
    with pytest.raises(ValueError, match="one residual per gradient"):
        comp.encode_decode_sum_into(grads, res_a[:2], out_a)
    with pytest.raises(ValueError, match="at least one"):
        comp.encode_decode_sum_into([], [], out_a)


@pytest.mark.parametrize("name", ["2bit", "1bit"])
@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_non_contiguous_and_shaped_arrays(make, name, path):
    if path == "numba":
        pytest.importorskip("numba")
    set_kernel_backend(path)
    comp = make(name, threshold=0.3)
    rng = np.random.default_rng(5)
    big = rng.standard_normal((40, 18)).astype(np.float32)
    g = big[:, 1:17]  # 40 x 16, not contiguous
    res_a, res_b = np.zeros(640, np.float32), np.zeros((40, 16), np.float32)
    holder_a, holder_b = np.ones((40, 20), np.float32), np.ones((40, 20), np.float32)
    out_a, out_b = holder_a[:, 2:18], holder_b[:, 2:18]  # non-contiguous outputs
    for acc in (False, True, True):
        set_kernel_backend("numpy")
        comp.decode(comp.encode(np.ascontiguousarray(g), res_a), out_a, accumulate=acc)
        set_kernel_backend(path)
        comp.encode_decode_into(g, res_b, out_b, accumulate=acc)
        np.testing.assert_array_equal(_bits(res_b.reshape(-1)), _bits(res_a))
        np.testing.assert_array_equal(_bits(holder_b), _bits(holder_a))
    # encode of a non-contiguous gradient, decode into a non-contiguous output
    p = comp.encode(g, res_b.reshape(-1))
    set_kernel_backend("numpy")
    want = comp.encode(np.ascontiguousarray(g), res_a)
    np.testing.assert_array_equal(p, want)
    set_kernel_backend(path)
    comp.decode(p, out_b, accumulate=True)
    set_kernel_backend("numpy")
    comp.decode(want, out_a, accumulate=True)
    np.testing.assert_array_equal(_bits(holder_b), _bits(holder_a))


@pytest.mark.parametrize("name", ["2bit", "1bit"])
def test_large_threaded_kernels_match_numpy(numba_path, make, monkeypatch, name):
    monkeypatch.setattr(_blocks, "PARALLEL_MIN", 1 << 16)  # several ranges over the pool
    n = 5 * _blocks.BLOCK + 9
    comp = make(name, threshold=0.2)
    rng = np.random.default_rng(7)
    r_np, r_nb, r_ed = (np.zeros(n, np.float32) for _ in range(3))
    o_np, o_ed = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for i in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        set_kernel_backend("numpy")
        p = comp.encode(g, r_np)
        comp.decode(p, o_np, accumulate=i > 0)
        set_kernel_backend("numba")
        np.testing.assert_array_equal(comp.encode(g, r_nb), p)
        comp.encode_decode_into(g, r_ed, o_ed, i > 0)
        np.testing.assert_array_equal(_bits(r_nb), _bits(r_np))
        np.testing.assert_array_equal(_bits(r_ed), _bits(r_np))
        np.testing.assert_array_equal(_bits(o_ed), _bits(o_np))


@pytest.mark.parametrize("name", ["2bit", "1bit"])
def test_encode_decode_into_checks(make, name):
    comp = make(name)
    with pytest.raises(DTypeMismatchError):
        comp.encode_decode_into(np.zeros(8), np.zeros(8), np.zeros(8))
    with pytest.raises(DTypeMismatchError, match="output"):
        comp.encode_decode_into(np.zeros(8, np.float32), np.zeros(8, np.float32), np.zeros(8))
    with pytest.raises(ShapeMismatchError, match="output has 4"):
        comp.encode_decode_into(np.zeros(8, np.float32), np.zeros(8, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        comp.encode_decode_into(np.zeros(8, np.float32), np.zeros(16, np.float32)[::2], np.zeros(8, np.float32))


def test_device_store_fused_path_matches_numpy(numba_path):
    """The device store's fused path (encode_decode_into per cache block) gives the numpy results."""
    import kvframe

    rng = np.random.default_rng(3)
    n = (1 << 18) + 37
    vals = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    results = {}
    for path in ("numpy", "numba"):
        set_kernel_backend(path)
        for comp in ("2bit", "1bit"):
            kv = kvframe.create("device")
            kv.set_gradient_compression({"type": comp, "threshold": 0.5})
            kv.init(0, np.zeros(n, np.float32))
            out = np.empty(n, np.float32)
            for _ in range(3):
                kv.push(0, vals)
                kv.pull(0, out=out)
            results[(path, comp)] = out.copy()
            kv.close()
    for comp in ("2bit", "1bit"):
        np.testing.assert_array_equal(_bits(results[("numba", comp)]), _bits(results[("numpy", comp)]))


# the switch ---------------------------------------------------------------------------------------
def test_backend_switch(monkeypatch):
    has_numba = importlib.util.find_spec("numba") is not None
    monkeypatch.delenv("KVFRAME_KERNELS", raising=False)
    assert set_kernel_backend(None) == ("numba" if has_numba else "numpy")
    assert set_kernel_backend("numpy") == "numpy" == kernel_backend()
    assert _kernels.numba_kernels() is None
    monkeypatch.setenv("KVFRAME_KERNELS", "numpy")
    assert set_kernel_backend(None) == "numpy"
    monkeypatch.setenv("KVFRAME_KERNELS", "fortran")
    with pytest.raises(ValueError, match="KVFRAME_KERNELS must be one of"):
        set_kernel_backend(None)
    with pytest.raises(ValueError, match="must be one of"):
        set_kernel_backend("cuda")
    monkeypatch.setenv("KVFRAME_KERNELS", "numpy")
    assert kernel_backend() == "numpy"  # the variable is read at every call
    if has_numba:
        assert set_kernel_backend("numba") == "numba" == kernel_backend()
        assert _kernels.numba_kernels() is not None


def test_without_numba_the_numpy_path_runs(monkeypatch, make):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, _kernels.COMPILED, raising=False)
    monkeypatch.setattr(kvframe.kernels, "_modules", {})  # nothing imported yet
    monkeypatch.delenv("KVFRAME_KERNELS", raising=False)
    assert set_kernel_backend(None) == "numpy"
    comp = make("2bit", threshold=0.5)
    out = np.empty(5, np.float32)
    comp.encode_decode_into(np.float32([1, -1, 0.2, 0.5, -0.6]), np.zeros(5, np.float32), out)
    np.testing.assert_array_equal(out, np.float32([0.5, -0.5, 0, 0.5, -0.5]))
    with pytest.raises(ImportError, match="numba cannot be imported"):
        set_kernel_backend("numba")
