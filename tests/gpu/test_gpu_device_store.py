"""Store 'device' with cupy arrays gives what store 'local' gives on numpy (GPU machines only)."""

from __future__ import annotations

import numpy as np
import pytest

import kvframe

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def gpus(cp):
    return list(range(cp.cuda.runtime.getDeviceCount()))


def on(cp, d, a):
    with cp.cuda.Device(d):
        return cp.asarray(a)


def slots(cp):
    """Two value slots per GPU, so a single-GPU machine still sums several arrays."""
    return [d for d in gpus(cp) for _ in range(2)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_push_pull_matches_local(cp, dtype):
    rng = np.random.default_rng(0)
    devs = slots(cp)
    shapes = {0: (5, 7), 1: (1 << 17,), 2: ()}
    ref, kv = kvframe.create("local"), kvframe.create("device")
    init = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    for store in (ref, kv):
        store.init(list(shapes), list(init.values()))
    grads = {k: [rng.standard_normal(s).astype(dtype) for _ in devs] for k, s in shapes.items()}
    ref.push(list(shapes), [grads[k] for k in shapes])
    kv.push(list(shapes), [[on(cp, d, g) for d, g in zip(devs, grads[k])] for k in shapes])
    for k, s in shapes.items():
        want = np.zeros(s, dtype)
        ref.pull(k, out=want)
        outs = [on(cp, d, np.zeros(s, dtype)) for d in gpus(cp)]
        kv.pull(k, out=outs)
        tol = 2e-3 if dtype == np.float16 else 1e-6
        for o in outs:
            np.testing.assert_allclose(o.get().astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)
    merge = kv.backend.merge_device(1)
    assert merge[0] == "gpu", f"cupy values are merged on a GPU, not {merge}"
    kv.close()
    ref.close()


def test_updater_on_gpu_matches_local(cp):
    rng = np.random.default_rng(1)
    devs = slots(cp)
    w0 = rng.standard_normal((128, 64)).astype(np.float32)
    ref, kv = kvframe.create("local"), kvframe.create("device")
    for store in (ref, kv):
        store.init("w", w0)
        store.set_optimizer("adam", learning_rate=0.01)
    for _ in range(3):
        gs = [rng.standard_normal(w0.shape).astype(np.float32) for _ in devs]
        ref.push("w", gs)
        kv.push("w", [on(cp, d, g) for d, g in zip(devs, gs)])
    want = np.zeros_like(w0)
    ref.pull("w", out=want)
    out = on(cp, 0, np.zeros_like(w0))
    kv.pull("w", out=out)
    np.testing.assert_allclose(out.get(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compression", [{"type": "2bit", "threshold": 0.5}, {"type": "1bit", "threshold": 0.0}])
def test_compression_on_gpu_matches_the_cpu_path(cp, compression):
    """The same pushes through 'device' on numpy (CPU slots) and on cupy (GPU slots) agree."""
    rng = np.random.default_rng(2)
    devs = slots(cp)
    cpu, gpu = kvframe.create("device"), kvframe.create("device")
    for store in (cpu, gpu):
        store.set_gradient_compression(dict(compression))
        store.init(9, np.zeros(10_001, np.float32))
    for _ in range(4):
        gs = [(rng.standard_normal(10_001) * 0.6).astype(np.float32) for _ in devs]
        cpu.push(9, gs)
        gpu.push(9, [on(cp, d, g) for d, g in zip(devs, gs)])
        want = np.zeros(10_001, np.float32)
        cpu.pull(9, out=want)
        out = on(cp, 0, np.zeros(10_001, np.float32))
        gpu.pull(9, out=out)
        np.testing.assert_allclose(out.get(), want, rtol=0, atol=1e-6)
