"""Store 'nccl' without a GPU: the error messages (real, with no cupy here) and the store's logic
over a CPU stand-in of cupy and NCCL (tests/nccl/nccl_fakecupy.py)."""

from __future__ import annotations

import importlib.util
import socket
import threading
import types

import nccl_fakecupy as fc
import numpy as np
import pytest

import kvframe
from kvframe import plugins
from kvframe.arrays import RowSparseArray
from kvframe.errors import ConfigError, NotSupportedError

HAVE_CUPY = importlib.util.find_spec("cupy") is not None


# what a user without the GPU stack sees ---------------------------------------------------------
def test_store_is_listed_without_importing_cupy():
    assert "nccl" in plugins.names("stores")


@pytest.mark.skipif(HAVE_CUPY, reason="cupy is installed here")
def test_without_cupy_create_says_what_to_install():
    with pytest.raises(kvframe.KVFrameError) as err:
        kvframe.create("nccl")
    msg = str(err.value)
    assert "needs cupy, which is not installed" in msg
    assert "pip install 'kvframe-nccl[cuda12]'" in msg and "kvframe-nccl[cuda13]" in msg
    assert isinstance(err.value, RuntimeError)
    # the rest of kvframe keeps working
    kv = kvframe.create("local")
    kv.init(0, np.ones(3, np.float32))
    out = np.zeros(3, np.float32)
    kv.pushpull(0, [np.ones(3, np.float32)] * 2, out=out)
    np.testing.assert_array_equal(out, 2)


def test_missing_nccl_library_is_named(monkeypatch):
    fc.install(monkeypatch, n_devices=2, nccl_available=False)
    with pytest.raises(kvframe.KVFrameError) as err:
        kvframe.create("nccl")
    msg = str(err.value)
    assert "missing the NCCL library" in msg and "nvidia-nccl-cu1" in msg and "a GPU" not in msg


def test_missing_gpu_is_named(monkeypatch):
    cupy = fc.install(monkeypatch, n_devices=0)
    with pytest.raises(kvframe.KVFrameError, match=r"missing a GPU \(cupy sees no CUDA device"):
        kvframe.create("nccl")

    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")

    cupy.cuda.runtime = types.SimpleNamespace(getDeviceCount=no_driver)
    with pytest.raises(kvframe.KVFrameError) as err:
        kvframe.create("nccl")
    assert "cudaErrorInsufficientDriver" in str(err.value) and "kvframe-nccl[cuda12]" in str(err.value)


def test_missing_gpu_and_nccl_are_both_named(monkeypatch):
    fc.install(monkeypatch, n_devices=0, nccl_available=False)
    with pytest.raises(kvframe.KVFrameError) as err:
        kvframe.create("nccl")
    assert "the NCCL library" in str(err.value) and "a GPU" in str(err.value)
    assert "The other stores" in str(err.value)


# the store's logic on the CPU stand-in ----------------------------------------------------------
@pytest.fixture
def fake(monkeypatch):
    for var in ("KVFRAME_RANK", "KVFRAME_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
                "DMLC_NUM_WORKER", "KVFRAME_NCCL_ADDR", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return fc.install(monkeypatch, n_devices=2)


def per_dev(a, devices=(0, 1)):
    return [fc.on(d, a) for d in devices]


def test_single_process_push_pull_over_two_gpus(fake):
    kv = kvframe.create("nccl")
    assert kv.backend.devices == [0, 1] and kv.rank == 0 and kv.num_workers == 1
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    kv.init("w", w)  # numpy is accepted by init (copied onto the first GPU)
    outs = per_dev(np.zeros((2, 3), np.float32))
    kv.pull("w", out=outs)
    for o in outs:
        np.testing.assert_array_equal(o, w)
    assert [o.device.id for o in outs] == [0, 1]
    g0, g1 = fc.on(0, np.full((2, 3), 1.5, np.float32)), fc.on(1, np.full((2, 3), 2.0, np.float32))
    kv.push("w", [g0, g1])
    kv.pull("w", out=outs)
    for o in outs:
        np.testing.assert_array_equal(o, 3.5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("algorithm", ["auto", "reduce_broadcast"])
def test_pushpull_matches_numpy_for_every_dtype(fake, dtype, algorithm):
    kv = kvframe.create("nccl", algorithm=algorithm)
    rng = np.random.default_rng(1)
    shapes = {0: (4, 5), 1: (300,), 2: (3,), 3: ()}
    for k, s in shapes.items():
        kv.init(k, np.zeros(s, dtype))
    vals = {k: [(rng.standard_normal(s) * 4).astype(dtype) for _ in range(2)] for k, s in shapes.items()}
    keys = list(shapes)
    gpu_vals = [[fc.on(d, vals[k][d]) for d in (0, 1)] for k in keys]
    outs = [[fc.on(d, np.zeros(shapes[k], dtype)) for d in (0, 1)] for k in keys]
    kv.pushpull(keys, gpu_vals, out=outs)
    for k in keys:
        want = (vals[k][0].astype(np.float64) + vals[k][1]).astype(dtype)
        for o in outs[k]:
            np.testing.assert_allclose(o.astype(np.float64), want.astype(np.float64), rtol=1e-3)
        pulled = fc.on(1, np.zeros(shapes[k], dtype))
        kv.pull(k, out=pulled)
        np.testing.assert_allclose(pulled.astype(np.float64), want.astype(np.float64), rtol=1e-3)


def test_key_list_is_one_group_and_small_keys_share_buckets(fake):
    kv = kvframe.create("nccl", bucket_bytes=4096, pack_threshold_bytes=1024)
    keys = list(range(20))
    kv.init(keys, [np.zeros(10, np.float32) for _ in keys])  # 40 bytes each: one bucket
    kv.init(100, np.zeros(1000, np.float32))
    fc.stats.update(groups=0, calls=0)
    vals = [per_dev(np.full(10, k, np.float32)) for k in keys] + [per_dev(np.ones(1000, np.float32))]
    outs = [per_dev(np.zeros(10, np.float32)) for k in keys] + [per_dev(np.zeros(1000, np.float32))]
    kv.pushpull(keys + [100], vals, out=outs)
    assert fc.stats["groups"] == 1  # one NCCL group for the whole key list
    assert fc.stats["calls"] == 2 * 2  # two units (the bucket, the big key) on two GPUs
    for k in keys:
        for o in outs[k]:
            np.testing.assert_array_equal(o, 2 * k)
    for o in outs[-1]:
        np.testing.assert_array_equal(o, 2)
    # push then pull: one reduce group, one broadcast group
    fc.stats.update(groups=0, calls=0)
    kv.push(keys, vals[:-1])
    kv.pull(keys, out=outs[:-1])
    assert fc.stats["groups"] == 2 and fc.stats["calls"] == 2 * 2
    for k in keys:
        np.testing.assert_array_equal(outs[k][1], 2 * k)


def test_updater_runs_once_per_key_on_the_first_gpu(fake):
    kv = kvframe.create("nccl", bucket_bytes=1024, pack_threshold_bytes=512)
    kv.init([0, 1], [np.ones(4, np.float32), np.ones(400, np.float32)])
    seen = []

    def sgd(key, grad, weight):
        seen.append((key, grad.device.id, weight.device.id))
        weight -= 0.1 * grad

    kv.set_updater(sgd)
    outs = [per_dev(np.zeros(4, np.float32)), per_dev(np.zeros(400, np.float32))]
    kv.pushpull([0, 1], [per_dev(np.ones(4, np.float32)), per_dev(np.ones(400, np.float32))], out=outs)
    assert sorted(seen) == [(0, 0, 0), (1, 0, 0)]
    for os_ in outs:
        for o in os_:
            np.testing.assert_allclose(o, 1 - 0.1 * 2)


def test_repeated_keys_several_values_per_gpu_and_missing_gpus(fake):
    kv = kvframe.create("nccl")
    kv.init(7, np.zeros(3, np.float32))
    a, b, c = fc.on(0, np.ones(3, np.float32)), fc.on(0, np.full(3, 2, np.float32)), fc.on(0, np.full(3, 4, np.float32))
    kv.push([7, 7], [[a, b], c])  # everything on GPU 0; GPU 1 contributes zeros
    out = fc.on(1, np.zeros(3, np.float32))
    kv.pull(7, out=out)
    np.testing.assert_array_equal(out, 7)
    two = [fc.on(1, np.zeros(3, np.float32)), fc.on(1, np.zeros(3, np.float32))]
    kv.pull(7, out=two)  # two outputs on one GPU
    for o in two:
        np.testing.assert_array_equal(o, 7)


def test_in_place_pushpull_and_aliasing_across_keys(fake):
    kv = kvframe.create("nccl", bucket_bytes=0, pack_threshold_bytes=0)
    kv.init([0, 1], [np.zeros(5, np.float32), np.zeros(5, np.float32)])
    xs = per_dev(np.full(5, 1.0, np.float32))
    ys = per_dev(np.full(5, 10.0, np.float32))
    kv.pushpull([0, 1], [xs, ys], out=[ys, xs])  # each key's output is the other key's input
    for x in xs:
        np.testing.assert_array_equal(x, 20)
    for y in ys:
        np.testing.assert_array_equal(y, 2)
    kv.pushpull(0, xs)  # out=None: in place
    for x in xs:
        np.testing.assert_array_equal(x, 40)
    out = fc.on(0, np.zeros(5, np.float32))
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, 40)


def test_pushpull_stores_false_refuses_a_stale_pull(fake):
    kv = kvframe.create("nccl", pushpull_stores=False)
    kv.init(0, np.zeros(4, np.float32))
    g = per_dev(np.ones(4, np.float32))
    kv.pushpull(0, g)
    for x in g:
        np.testing.assert_array_equal(x, 2)
    with pytest.raises(NotSupportedError, match="pushpull_stores=False"):
        kv.pull(0, out=fc.on(0, np.zeros(4, np.float32)))
    kv.push(0, per_dev(np.ones(4, np.float32)))  # a push stores again
    out = fc.on(0, np.zeros(4, np.float32))
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, 2)


def test_refusals_are_clear_and_leave_the_store_unchanged(fake):
    kv = kvframe.create("nccl", devices=[0])
    kv.init(0, np.ones(3, np.float32))
    with pytest.raises(TypeError, match=r"key 0: pushed value is a ndarray; store 'nccl' moves cupy arrays"):
        kv.push(0, np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"is on GPU 1, but this nccl store drives GPUs \[0\]"):
        kv.push(0, fc.on(1, np.ones(3, np.float32)))
    with pytest.raises(NotSupportedError, match="does not support gradient compression"):
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    with pytest.raises(NotSupportedError, match="row-sparse"):
        kv.init(1, RowSparseArray(np.ones((1, 2), np.float32), [0], (3, 2)))
    with pytest.raises(NotSupportedError, match="row_sparse_pull"):
        kv.row_sparse_pull(0, out=RowSparseArray.zeros((3,)), row_ids=np.array([0]))
    with pytest.raises(TypeError, match="key 2: store 'nccl' sums .* got dtype complex64"):
        kv.init(2, np.ones(2, np.complex64))
    assert not kv.is_capable("compression") and kv.is_capable("optimizer")
    out = fc.on(0, np.zeros(3, np.float32))
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, 1)
    with pytest.raises(ConfigError, match=r"devices \[0, 5\] include \[5\]"):
        kvframe.create("nccl", devices=[0, 5])
    kv.close()
    kv.close()  # twice is fine
    with pytest.raises(NotSupportedError, match="closed"):
        kv.push(0, fc.on(0, np.ones(3, np.float32)))


def test_mode_multi_without_a_launcher_says_what_to_set(fake):
    with pytest.raises(ConfigError, match="KVFRAME_RANK/KVFRAME_WORLD_SIZE"):
        kvframe.create("nccl", mode="multi")


def test_multi_process_mode_world_size_one(fake, monkeypatch):
    monkeypatch.setenv("KVFRAME_RANK", "0")
    monkeypatch.setenv("KVFRAME_WORLD_SIZE", "1")
    monkeypatch.setenv("KVFRAME_LOCAL_RANK", "1")
    kv = kvframe.create("nccl")
    assert kv.backend.multi and kv.backend.devices == [1] and kv.num_workers == 1
    kv.init("w", np.ones(3, np.float32))
    g = fc.on(1, np.full(3, 2, np.float32))
    kv.pushpull("w", g)
    np.testing.assert_array_equal(g, 2)
    kv.barrier()
    kv.close()


def test_multi_process_mode_needs_a_rendezvous_address(fake):
    with pytest.raises(ConfigError, match="KVFRAME_NCCL_ADDR=host:port"):
        kvframe.create("nccl", rank=0, world_size=2)


def test_multi_process_mode_two_ranks_over_the_real_rendezvous(fake):
    """Two threads stand in for two processes: the unique id travels over TCP, the fake NCCL sums."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results, errors = {}, {}

    def rank_main(rank):
        try:
            kv = kvframe.create("nccl", rank=rank, world_size=2, local_rank=rank, rendezvous=f"127.0.0.1:{port}",
                                rendezvous_timeout=20, bucket_bytes=1024, pack_threshold_bytes=256)
            kv.init(["a", "b", "c"], [np.full(3, 10 + rank, np.float32), np.zeros(2, np.float64),
                                      np.zeros(500, np.float32)])
            out = fc.on(rank, np.zeros(3, np.float32))
            kv.pull("a", out=out)
            results[(rank, "init")] = out.get()
            kv.set_updater(lambda key, grad, weight: weight.__isub__(grad))
            grads = [fc.on(rank, np.full(3, rank + 1, np.float32)), fc.on(rank, np.ones(2, np.float64)),
                     fc.on(rank, np.full(500, rank, np.float32))]
            kv.push(["a", "b", "c"], grads)
            outs = [fc.on(rank, np.zeros(3, np.float32)), fc.on(rank, np.zeros(2, np.float64)),
                    fc.on(rank, np.zeros(500, np.float32))]
            kv.pull(["a", "b", "c"], out=outs)
            results[(rank, "pull")] = [o.get() for o in outs]
            kv.barrier()
            results[(rank, "who")] = (kv.rank, kv.num_workers, kv.backend.devices)
            kv.close()
        except Exception as exc:  # reported below
            errors[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for rank in (0, 1):
        np.testing.assert_array_equal(results[(rank, "init")], 10)  # rank 0's value wins
        a, b, c = results[(rank, "pull")]
        np.testing.assert_array_equal(a, 10 - 3)
        np.testing.assert_array_equal(b, -2)
        np.testing.assert_array_equal(c, -1)
        assert results[(rank, "who")] == (rank, 2, [rank])


def test_a_hung_collective_times_out_and_aborts_the_communicator(fake, monkeypatch):
    kv = kvframe.create("nccl", rank=0, world_size=1, timeout=0.2)
    kv.init(0, np.zeros(3, np.float32))
    comm = kv.backend._comms[0]
    monkeypatch.setattr(fc.Event, "done", False)  # the GPU never finishes
    with pytest.raises(kvframe.errors.KVTimeoutError, match=r"timed out after 0.2 s .*pushpull of keys \[0\]"):
        kv.pushpull(0, fc.on(0, np.ones(3, np.float32)))
    monkeypatch.setattr(fc.Event, "done", True)
    # world size 1: nothing to abort; the store still works
    kv.pushpull(0, fc.on(0, np.ones(3, np.float32)))
    # across processes the communicator is aborted and the store closed
    kv.backend._world = 2
    monkeypatch.setattr(fc.Event, "done", False)
    with pytest.raises(kvframe.errors.KVTimeoutError, match="communicator was aborted"):
        kv.barrier()
    assert getattr(comm, "aborted", False)
    with pytest.raises(NotSupportedError, match="closed"):
        kv.pull(0, out=fc.on(0, np.zeros(3, np.float32)))


def test_bfloat16_keys_where_arrays_carry_it(fake):
    """bfloat16 (ml_dtypes' numpy type) travels as NCCL_BFLOAT16, packed and unpacked bit for bit."""
    ml = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml.bfloat16)
    kv = kvframe.create("nccl", bucket_bytes=1024, pack_threshold_bytes=256)
    shapes = [(3,), (5, 2), (300,)]  # two packed, one alone
    kv.init([0, 1, 2], [np.zeros(s, bf16) for s in shapes])
    vals = [[fc.on(d, np.full(s, 1.5 + d, bf16)) for d in (0, 1)] for s in shapes]
    outs = [[fc.on(d, np.zeros(s, bf16)) for d in (0, 1)] for s in shapes]
    kv.pushpull([0, 1, 2], vals, out=outs)
    for os_ in outs:
        for o in os_:
            assert o.dtype == bf16
            np.testing.assert_array_equal(o.astype(np.float32), 4.0)
    kv.push([0, 1, 2], vals)
    kv.pull([0, 1, 2], out=outs)
    for os_ in outs:
        np.testing.assert_array_equal(os_[1].astype(np.float32), 4.0)
