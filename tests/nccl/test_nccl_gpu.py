"""Store 'nccl' on real GPUs against a numpy reference (skipped where cupy sees no GPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import kvframe

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import nccl

    if not getattr(nccl, "available", False):
        pytest.skip("cupy cannot load NCCL")
    return cupy


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for var in ("KVFRAME_RANK", "KVFRAME_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
                "DMLC_NUM_WORKER"):
        monkeypatch.delenv(var, raising=False)


def n_gpus(cp) -> int:
    return cp.cuda.runtime.getDeviceCount()


def on(cp, device, a):
    with cp.cuda.Device(device):
        return cp.asarray(a)


def bf16():
    ml = pytest.importorskip("ml_dtypes")
    return np.dtype(ml.bfloat16)


def dtypes_to_test():
    out = [np.float16, np.float32, np.float64]
    try:
        import ml_dtypes

        out.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return out


def gpu_array_of(cp, device, a):
    """``a`` on the GPU; for bfloat16 (which cupy may not know) through its uint16 bits."""
    if np.dtype(a.dtype).name == "bfloat16":
        with cp.cuda.Device(device):
            try:
                return cp.asarray(a.view(np.uint16)).view(a.dtype)
            except Exception as exc:
                pytest.skip(f"this cupy cannot hold bfloat16 arrays ({type(exc).__name__}: {exc})")
    return on(cp, device, a)


def host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def tolerance(dtype):
    name = np.dtype(dtype).name
    return {"float16": 2e-3, "bfloat16": 2e-2}.get(name, 1e-6)


@pytest.mark.parametrize("dtype", dtypes_to_test(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ["auto", "reduce_broadcast"])
def test_every_dtype_against_numpy(cp, dtype, algorithm):
    devices = list(range(n_gpus(cp)))
    kv = kvframe.create("nccl", algorithm=algorithm, bucket_bytes=1 << 16, pack_threshold_bytes=1 << 12)
    rng = np.random.default_rng(0)
    shapes = [(7,), (33, 3), (), (1 << 16,), (5, 1000), (1,)]  # small ones share a bucket, big ones go alone
    keys = list(range(len(shapes)))
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    kv.init(keys, [gpu_array_of(cp, 0, a) for a in init])
    grads = [[rng.standard_normal(s).astype(dtype) for _ in devices] for s in shapes]
    want = [np.sum([g.astype(np.float64) for g in gs], axis=0) for gs in grads]
    vals = [[gpu_array_of(cp, d, g) for d, g in zip(devices, gs)] for gs in grads]
    outs = [[gpu_array_of(cp, d, np.zeros(s, dtype)) for d in devices] for s in shapes]
    kv.pushpull(keys, vals, out=outs)
    for w, os_ in zip(want, outs):
        for o in os_:
            np.testing.assert_allclose(host(o).astype(np.float64), w, rtol=tolerance(dtype), atol=tolerance(dtype))
    # push then pull: reduce to the first GPU, broadcast back
    kv.push(keys, vals)
    outs2 = [[gpu_array_of(cp, d, np.zeros(s, dtype)) for d in devices] for s in shapes]
    kv.pull(keys, out=outs2)
    for w, os_ in zip(want, outs2):
        for o in os_:
            np.testing.assert_allclose(host(o).astype(np.float64), w, rtol=tolerance(dtype), atol=tolerance(dtype))
    kv.close()


def test_in_place_pushpull_and_pull_after_it(cp):
    devices = list(range(n_gpus(cp)))
    kv = kvframe.create("nccl")
    kv.init("g", np.zeros((256, 256), np.float32))
    grads = [on(cp, d, np.full((256, 256), d + 1, np.float32)) for d in devices]
    kv.pushpull("g", grads)
    total = sum(d + 1 for d in devices)
    for g in grads:
        assert float(g[3, 7]) == total and int((g != total).sum()) == 0
    out = on(cp, devices[-1], np.zeros((256, 256), np.float32))
    kv.pull("g", out=out)
    assert int((out != total).sum()) == 0
    kv.close()


def test_many_small_keys_in_buckets(cp):
    devices = list(range(n_gpus(cp)))
    kv = kvframe.create("nccl")
    keys = list(range(300))
    kv.init(keys, [np.zeros(k % 17 + 1, np.float32) for k in keys])
    vals = [[on(cp, d, np.full(k % 17 + 1, k + d, np.float32)) for d in devices] for k in keys]
    outs = [[on(cp, d, np.zeros(k % 17 + 1, np.float32)) for d in devices] for k in keys]
    kv.pushpull(keys, vals, out=outs)
    for k, os_ in zip(keys, outs):
        want = sum(k + d for d in devices)
        for o in os_:
            np.testing.assert_array_equal(host(o), want)
    kv.close()


@pytest.mark.parametrize("opt", [{"type": "sgd", "learning_rate": 0.1, "momentum": 0.9, "wd": 1e-3},
                                 {"type": "adam", "learning_rate": 0.01}])
def test_updater_runs_on_the_gpu_and_matches_the_local_store(cp, opt):
    devices = list(range(n_gpus(cp)))
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((64, 32)).astype(np.float32)
    small0 = rng.standard_normal(10).astype(np.float32)
    ref = kvframe.create("local")
    kv = kvframe.create("nccl")
    for store in (ref, kv):
        store.init([0, 1], [w0, small0])
        store.set_optimizer(dict(opt))
    for _ in range(3):
        gs = [rng.standard_normal((64, 32)).astype(np.float32) for _ in devices]
        hs = [rng.standard_normal(10).astype(np.float32) for _ in devices]
        ref.push([0, 1], [gs, hs])
        kv.push([0, 1], [[on(cp, d, g) for d, g in zip(devices, gs)], [on(cp, d, h) for d, h in zip(devices, hs)]])
    w_ref, s_ref = np.zeros_like(w0), np.zeros_like(small0)
    ref.pull([0, 1], out=[w_ref, s_ref])
    outs = [[on(cp, d, np.zeros_like(w0)) for d in devices], [on(cp, d, np.zeros_like(small0)) for d in devices]]
    kv.pull([0, 1], out=outs)
    for o in outs[0]:
        np.testing.assert_allclose(host(o), w_ref, rtol=1e-5, atol=1e-6)
    for o in outs[1]:
        np.testing.assert_allclose(host(o), s_ref, rtol=1e-5, atol=1e-6)
    states = kv.backend._updater.states[0].arrays
    assert all(isinstance(a, cp.ndarray) for a in states.values()), "optimizer states live on the GPU"
    kv.close()


def test_refusals_on_gpu(cp):
    kv = kvframe.create("nccl", devices=[0])
    kv.init(0, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="store 'nccl' moves cupy arrays"):
        kv.push(0, np.ones(3, np.float32))
    with pytest.raises(kvframe.KVFrameError, match="gradient compression"):
        kv.set_gradient_compression({"type": "2bit"})
    kv.close()


def test_pushpull_stores_false(cp):
    kv = kvframe.create("nccl", devices=[0], pushpull_stores=False)
    kv.init(0, np.zeros(3, np.float32))
    g = on(cp, 0, np.ones(3, np.float32))
    kv.pushpull(0, g)
    np.testing.assert_array_equal(host(g), 1)
    with pytest.raises(kvframe.KVFrameError, match="pushpull_stores=False"):
        kv.pull(0, out=on(cp, 0, np.zeros(3, np.float32)))
    kv.close()


def test_non_blocking_handle(cp):
    kv = kvframe.create("nccl", devices=[0])
    kv.init(0, np.zeros(1 << 20, np.float32))
    g = on(cp, 0, np.ones(1 << 20, np.float32))
    h = kv.pushpull(0, g, wait=False)
    h.wait(30)
    assert h.done() and float(g.sum()) == float(1 << 20)
    kv.close()


def test_multi_process_mode_world_size_one(cp):
    kv = kvframe.create("nccl", rank=0, world_size=1, local_rank=0)
    assert kv.backend.multi and kv.num_workers == 1 and kv.rank == 0
    kv.init(["a", "b"], [np.ones(5, np.float32), np.ones(100_000, np.float64)])
    kv.set_optimizer("sgd", learning_rate=0.5)
    ga, gb = on(cp, 0, np.full(5, 2, np.float32)), on(cp, 0, np.full(100_000, 4, np.float64))
    kv.push(["a", "b"], [ga, gb])
    oa, ob = on(cp, 0, np.zeros(5, np.float32)), on(cp, 0, np.zeros(100_000, np.float64))
    kv.pull(["a", "b"], out=[oa, ob])
    np.testing.assert_allclose(host(oa), 1 - 0.5 * 2)
    np.testing.assert_allclose(host(ob), 1 - 0.5 * 4)
    kv.barrier()
    kv.close()


WORKER = textwrap.dedent("""
    import numpy as np, cupy, kvframe
    kv = kvframe.create('nccl')
    r, n = kv.rank, kv.num_workers
    dev = kv.backend.devices[0]
    kv.init(['w', 's'], [np.full(1 << 18, 10.0 + r, np.float32), np.full(3, r, np.float16)])
    with cupy.cuda.Device(dev):
        w = cupy.zeros(1 << 18, cupy.float32); s = cupy.zeros(3, cupy.float16)
        kv.pull(['w', 's'], out=[w, s])
        assert float(w[0]) == 10.0 and float(s[0]) == 0.0, 'rank 0 value must win at init'
        g = cupy.full(1 << 18, r + 1, cupy.float32); h = cupy.full(3, 1, cupy.float16)
        kv.pushpull(['w', 's'], [g, h])
        assert float(g[5]) == n * (n + 1) / 2 and float(h[2]) == n, (float(g[5]), float(h[2]))
        kv.set_optimizer('sgd', learning_rate=0.1)
        kv.push('w', cupy.ones(1 << 18, cupy.float32))
        kv.pull('w', out=w)
        assert abs(float(w[7]) - (n * (n + 1) / 2 - 0.1 * n)) < 1e-5, float(w[7])
    kv.barrier()
    kv.close()
    print('rank', r, 'ok')
""")


def test_multi_process_mode_one_process_per_gpu(cp):
    """One process per GPU, ranks from KVFRAME_* variables. With one GPU this is world size 1 (the
    launcher path end to end, no socket); with more, the unique id travels over the TCP rendezvous.
    NCCL does not put two ranks of a communicator on one GPU, so one GPU cannot test more."""
    n = n_gpus(cp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(n):
        env = {**os.environ, "KVFRAME_RANK": str(r), "KVFRAME_WORLD_SIZE": str(n), "KVFRAME_LOCAL_RANK": str(r),
               "KVFRAME_NCCL_ADDR": f"127.0.0.1:{port}", "KVFRAME_TIMEOUT": "60"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outputs.append((p.returncode, out))
    for r, (rc, out) in enumerate(outputs):
        assert rc == 0 and f"rank {r} ok" in out, f"rank {r} exited {rc}:\n{out[-3000:]}"
