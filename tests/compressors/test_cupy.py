"""The CUDA kernels give the same bytes, residuals and values as the numpy path (GPU machines only)."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


@pytest.mark.parametrize("name, options", [("2bit", {"threshold": 0.5}), ("2bit", {"threshold": 0.07}),
                                           ("1bit", {"threshold": -0.5}), ("1bit", {"threshold": 0.0}),
                                           ("1bit", {"threshold": 0.5})])
@pytest.mark.parametrize("n", [1, 15, 17, 33, 1000, (1 << 20) + 5])
def test_quantizers_bit_identical_on_gpu(cp, make, name, options, n):
    comp = make(name, **options)
    rng = np.random.default_rng(n)
    res_np = np.zeros(n, np.float32)
    res_cp = cp.zeros(n, cp.float32)
    for _ in range(4):
        g = (rng.standard_normal(n) * 0.5).astype(np.float32)
        p_np = comp.encode(g, res_np)
        p_cp = comp.encode(cp.asarray(g), res_cp)
        assert isinstance(p_cp, cp.ndarray) and p_cp.dtype == cp.uint8
        np.testing.assert_array_equal(cp.asnumpy(p_cp), p_np)
        np.testing.assert_array_equal(cp.asnumpy(res_cp), res_np)
        out_np = np.full(n, 0.25, np.float32)
        out_cp = cp.full(n, 0.25, cp.float32)
        comp.decode(p_np, out_np, accumulate=True)
        comp.decode(p_cp, out_cp, accumulate=True)
        np.testing.assert_array_equal(cp.asnumpy(out_cp), out_np)
        comp.decode(p_cp, out_cp)
        comp.decode(p_np, out_np)
        np.testing.assert_array_equal(cp.asnumpy(out_cp), out_np)


@pytest.mark.parametrize("name, options", [("2bit", {"threshold": 0.5}), ("1bit", {"threshold": -0.5}),
                                           ("1bit", {"threshold": 0.25})])
@pytest.mark.parametrize("n", [1, 17, 1000, (1 << 18) + 3])
def test_encode_decode_into_on_gpu(cp, make, name, options, n):
    """The one-kernel encode + decode equals the numpy path's decode(encode()), accumulate both ways."""
    comp = make(name, **options)
    rng = np.random.default_rng(n)
    res_np, res_cp = np.zeros(n, np.float32), cp.zeros(n, cp.float32)
    out_np = np.full(n, 0.5, np.float32)
    out_cp = cp.asarray(out_np)
    for step in range(4):
        g = (rng.standard_normal(n) * 0.5).astype(np.float32)
        g[::3] = np.float32(options["threshold"])
        if step == 2:
            g[1::50], g[2::70] = np.nan, np.inf
        acc = step > 0
        comp.decode(comp.encode(g, res_np), out_np, accumulate=acc)
        assert comp.encode_decode_into(cp.asarray(g), res_cp, out_cp, accumulate=acc) is out_cp
        np.testing.assert_array_equal(cp.asnumpy(res_cp).view(np.uint32), res_np.view(np.uint32))
        np.testing.assert_array_equal(cp.asnumpy(out_cp).view(np.uint32), out_np.view(np.uint32))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_casts_bit_identical_on_gpu(cp, make, name):
    comp = make(name)
    rng = np.random.default_rng(9)
    g = (rng.standard_normal(100_003) * 100).astype(np.float32)
    g[:3] = [1e5, -1e38, 65519]  # beyond fp16's range: saturated, the excess kept in the residual
    res_np, res_cp = np.zeros_like(g), cp.zeros(g.size, cp.float32)
    for _ in range(2):
        p_np = comp.encode(g, res_np)
        p_cp = comp.encode(cp.asarray(g), res_cp)
        np.testing.assert_array_equal(cp.asnumpy(p_cp).view(np.uint16), p_np.view(np.uint16))
        out_cp = cp.empty(g.size, cp.float32)
        out_np = np.empty_like(g)
        comp.decode(p_cp, out_cp)
        comp.decode(p_np, out_np)
        np.testing.assert_array_equal(cp.asnumpy(out_cp), out_np)


def test_topk_on_gpu_conserves_mass(cp, make):
    comp = make("topk", ratio=0.1)
    rng = np.random.default_rng(2)
    res = cp.zeros(5000, cp.float64)
    sent = cp.zeros(5000, cp.float64)
    pushed = np.zeros(5000)
    for _ in range(10):
        g = rng.standard_normal(5000)
        pushed += g
        comp.decode(comp.encode(cp.asarray(g), res), sent, accumulate=True)
    np.testing.assert_allclose(cp.asnumpy(sent + res), pushed, atol=1e-12)


def _gpu_ids(cp):
    n = cp.cuda.runtime.getDeviceCount()
    return list(range(min(n, 4))) if n > 1 else [0, 0]


def test_device_store_on_gpus_matches_numpy(cp):
    import kvframe

    ids = _gpu_ids(cp)
    n = 300_001
    rng = np.random.default_rng(5)
    for comp in [None, {"type": "2bit", "threshold": 0.5}, {"type": "1bit", "threshold": 0.1}]:
        kv_gpu, kv_cpu = kvframe.create("device"), kvframe.create("device")
        if comp:
            kv_gpu.set_gradient_compression(comp)
            kv_cpu.set_gradient_compression(comp)
        w = rng.standard_normal(n).astype(np.float32)
        kv_gpu.init(0, cp.asarray(w))
        kv_cpu.init(0, w)
        for _ in range(3):
            grads = [rng.standard_normal(n).astype(np.float32) for _ in ids]
            on_gpu = []
            for d, g in zip(ids, grads):
                with cp.cuda.Device(d):
                    on_gpu.append(cp.asarray(g))
            kv_gpu.push(0, on_gpu)
            kv_cpu.push(0, grads)
            outs = []
            for d in ids:
                with cp.cuda.Device(d):
                    outs.append(cp.empty(n, cp.float32))
            kv_gpu.pull(0, out=outs)
            want = np.empty(n, np.float32)
            kv_cpu.pull(0, out=want)
            for o, d in zip(outs, ids):
                assert o.device.id == d
                if comp:
                    np.testing.assert_array_equal(cp.asnumpy(o), want)
                else:  # the GPU may sum in another order
                    np.testing.assert_allclose(cp.asnumpy(o), want, rtol=1e-5, atol=1e-5)
        assert kv_gpu.backend.merge_device(0)[0] == "gpu"


def test_device_store_hand_checked_sequence_on_gpu(cp):
    import kvframe

    ids = _gpu_ids(cp)[:2]
    kv = kvframe.create("device")
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init(0, cp.zeros(4, cp.float32))
    vals = []
    for d, v in zip(ids, ([0.4, 0.6, -0.7, 0.1], [0.6, 0.6, -0.2, 0.1])):
        with cp.cuda.Device(d):
            vals.append(cp.asarray(v, cp.float32))
    out = np.empty(4, np.float32)
    kv.push(0, vals)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, np.float32([0.5, 1, -0.5, 0]))
    kv.push(0, vals)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, np.float32([1, 1, -0.5, 0]))
