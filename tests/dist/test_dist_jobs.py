"""Real jobs on loopback: scheduler, servers and workers as processes started by kvframe-launch."""

from __future__ import annotations

import textwrap

import pytest
from dist_helpers import Job, assert_ok, run_job

pytestmark = pytest.mark.dist


def _have(kind: str, name: str) -> bool:
    from kvframe import plugins

    return name in plugins.names(kind)


@pytest.mark.parametrize("kvtype", ["dist_sync", "dist_device_sync"])
def test_sync_sums_pushes_with_exact_values(tmp_path, kvtype):
    job = run_job(tmp_path, """
        # init is collective with rank 0's value
        kv.init(3, np.full((4, 5), 10.0 + rank, np.float32))
        kv.init([5, 9], [np.zeros(10, np.float32), np.zeros((600, 3), np.float32)])  # 9 is split (bound 1000)
        out = np.empty((4, 5), np.float32)
        kv.pull(3, out=out)
        assert (out == 10).all(), out
        for r in range(3):
            kv.push(3, np.full((4, 5), rank + 1.0 + r, np.float32), priority=-r)
            kv.pull(3, out=out, priority=r)                  # priorities travel; the value is the same
            assert (out == 3 + 2 * r).all(), (r, out)      # (1+r) + (2+r): summed, not averaged
            # a list of per-device values is summed on the worker first
            kv.push([5, 9], [[np.full(10, 1.0, np.float32), np.full(10, 2.0, np.float32)],
                             np.arange(1800, dtype=np.float32).reshape(600, 3) * (rank + 1)])
            o = [np.empty(10, np.float32), np.empty((600, 3), np.float32)]
            kv.pull([5, 9], out=o)
            assert (o[0] == 6).all(), o[0]
            assert np.array_equal(o[1], np.arange(1800, dtype=np.float32).reshape(600, 3) * 3)
            v = np.full(10, 0.5 * (rank + 1), np.float32)
            kv.pushpull(5, v)                                 # out=None writes into value
            assert (v == 1.5).all(), v
        # a pull into several outputs, and a non-contiguous output
        outs = [np.empty((4, 5), np.float32), np.empty((5, 4), np.float32).T]
        kv.pull(3, out=outs)
        assert all((x == 7).all() for x in outs)
        # broadcast: rank 0's value reaches everyone
        b = np.empty(7, np.float64)
        kv.broadcast(11, np.full(7, 42.0 + rank), out=b)
        assert (b == 42).all(), b
        kv.send_command_to_servers(7, f"hello from {rank}")
        kv.barrier()
        stats = kv.backend.server_stats()
        assert sum(s["elements"] for s in stats) == 20 + 10 + 1800 + 7, stats
        assert all(s["errors"] == 0 and s["dropped"] == 0 for s in stats), stats
        assert all(sorted(map(tuple, s["commands"])) == [(7, "hello from 0"), (7, "hello from 1")] for s in stats)
        assert kv.type == KVTYPE
        kv.barrier()
        print("DONE")
        kv.close()
    """, env={"KVFRAME_BIGARRAY_BOUND": "1000", "KVTYPE": kvtype})
    assert_ok(job)


@pytest.mark.skipif(not _have("optimizers", "sgd"), reason="kvframe_optimizers' sgd is not installed")
def test_sync_with_sgd_on_servers(tmp_path):
    job = run_job(tmp_path, """
        kv.init(0, np.zeros(8, np.float32))
        kv.init(1, np.zeros(3000, np.float32))       # split over both servers
        kv.set_optimizer("sgd", learning_rate=0.1)
        out = np.empty(8, np.float32)
        big = np.empty(3000, np.float32)
        for step in range(1, 4):
            kv.push([0, 1], [np.ones(8, np.float32), np.ones(3000, np.float32)])
            kv.pull([0, 1], out=[out, big])
            want = np.float32(0)
            for _ in range(step):
                want = np.float32(want - np.float32(0.1) * np.float32(2))
            assert (out == want).all() and (big == want).all(), (step, out, big[:3])
        assert abs(float(out[0]) + 0.6) < 1e-6
        stats = kv.backend.server_stats()
        assert all(json.loads(s["optimizer"])["type"] == "sgd" for s in stats)
        print("DONE")
    """, env={"KVFRAME_BIGARRAY_BOUND": "1000"})
    assert_ok(job)


@pytest.mark.skipif(not _have("optimizers", "sgd"), reason="kvframe_optimizers' sgd is not installed")
def test_async_applies_each_push_and_needs_an_optimizer(tmp_path):
    job = run_job(tmp_path, """
        kv.init(0, np.zeros(4, np.float32))
        if rank == 0:
            kv.push(0, np.ones(4, np.float32))
            exc = expect_raises(RemoteError, kv.pull, 0, out=np.empty(4, np.float32), match="needs an optimizer")
            print("refused:", exc)
        kv.barrier()
        kv.set_optimizer("sgd", learning_rate=0.5)
        for _ in range(3):
            kv.push(0, np.ones(4, np.float32))
        kv.barrier()
        out = np.empty(4, np.float32)
        kv.pull(0, out=out)
        assert (out == -3.0).all(), out    # 2 workers x 3 pushes, each applied at once: -0.5 each
        print("DONE")
    """, env={"KVTYPE": "dist_async"})
    assert_ok(job)
    assert any("dist_async needs an optimizer" in ln for ln in job.lines("worker 0")), job.out


TRANSPORTS = ["tcp", "shm", "zmq", "plainpipe"]  # plainpipe: the test plugin package's, pip-installed


def shared_memory_line(job: Job, transport: str) -> None:
    """Only the shm transport uses shared memory, with every server (one host, proven)."""
    info = job.lines("worker 0")[0]
    assert info.startswith("INFO "), job.out
    info = eval(info[5:])
    peers = set(info["shared_memory_peers"])
    assert peers >= set(info["servers"]) if transport == "shm" else not peers, job.out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_small_keys_in_one_call(tmp_path, transport):
    """A call's many small shards travel in one message per server, in any dtype mix."""
    job = run_job(tmp_path, """
        keys = list(range(40))
        kv.init(keys, [np.zeros((8, 64), np.float32)] * 40)          # 2 KiB each, 80 KiB per call
        kv.init([100, 101], [np.zeros(3, np.float64), np.zeros(5, np.int32)])
        outs = [np.empty((8, 64), np.float32) for _ in keys]
        for r in range(4):
            vals = [np.full((8, 64), k + r + 10.0 * rank, np.float32) for k in keys]
            kv.push(keys, vals)
            kv.pull(keys, out=outs)
            assert all((o == 2 * (k + r) + 10).all() for k, o in zip(keys, outs)), r
            sub = [keys[7], keys[3]]                                 # not consecutive: values over the socket
            so = [np.empty((8, 64), np.float32) for _ in sub]
            kv.pull(sub, out=so)
            assert all((o == 2 * (k + r) + 10).all() for k, o in zip(sub, so)), r
            v = [np.full((8, 64), 1.0 + rank, np.float32) for _ in keys]
            kv.pushpull(keys, v, out=outs)
            assert all((o == 3).all() for o in outs)
            mixed = [101, *keys, 100]                                 # other dtypes, 20 bytes (padded in the file)
            mv = [np.full(5, r + rank, np.int32), *vals, np.full(3, 0.5 * rank, np.float64)]
            mo = [np.empty(5, np.int32), *outs, np.empty(3, np.float64)]
            kv.push(mixed, mv)
            kv.pull(mixed, out=mo)
            assert (mo[0] == 2 * r + 1).all() and (mo[-1] == 0.5).all(), mo
            assert all((o == 2 * (k + r) + 10).all() for k, o in zip(keys, mo[1:-1])), r
        kv.barrier()
        if rank == 0:   # two pushes from one worker make a round; the second finds the batch file busy
            kv.push(keys, [np.full((8, 64), 1.0, np.float32)] * 40)
            kv.push(keys, [np.full((8, 64), 2.0, np.float32)] * 40)
        kv.barrier()
        kv.pull(keys, out=outs)
        assert all((o == 3).all() for o in outs)
        kv.barrier()
        stats = kv.backend.server_stats()
        assert all(s["errors"] == 0 and s["dropped"] == 0 for s in stats), stats
        print("INFO", kv.backend.transport_info())
        kv.barrier()
        print("DONE")
    """, env={"KVFRAME_TRANSPORT": transport})
    assert_ok(job)
    shared_memory_line(job, transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_big_array_is_split_evenly_over_servers(tmp_path, transport):
    job = run_job(tmp_path, """
        n = 1_500_001
        kv.init("w", np.zeros(n, np.float32))
        kv.init("b", np.zeros(10, np.float32))
        stats = kv.backend.server_stats()
        sizes = sorted(s["elements"] for s in stats)
        assert sizes in ([750000, 750011], [750001, 750010]), sizes   # 1,500,001 split in two plus one small key
        g = np.arange(n, dtype=np.float32) * (1 + rank)
        out = np.empty(n, np.float32)
        kv.pushpull("w", g, out=out)
        assert np.array_equal(out, np.arange(n, dtype=np.float32) * 3)
        kv.barrier()
        if rank == 0:        # two pushes from one worker make a round (as in MXNet); the second waits for the first
            kv.push("w", g)
            kv.push("w", g * 2)
        kv.barrier()
        kv.pull("w", out=out)
        assert np.array_equal(out, np.arange(n, dtype=np.float32) * 3)
        kv.barrier()
        kv.push(["w", "w"], [g, g])                     # a key twice in one call: summed on the worker
        kv.pull("w", out=out)
        assert np.array_equal(out, np.arange(n, dtype=np.float32) * 6)
        print("INFO", kv.backend.transport_info())
        kv.barrier()
        print("DONE")
    """, env={"KVFRAME_TRANSPORT": transport})
    assert_ok(job)
    shared_memory_line(job, transport)


def test_string_keys_map_to_ints_in_init_order(tmp_path):
    job = run_job(tmp_path, """
        kv.init(["alpha", "beta"], [np.zeros(3, np.int64), np.ones((2, 2), np.float64)])
        kv.init("gamma", np.zeros(5, np.float32))
        assert kv.backend._str_ids == {"alpha": 0, "beta": 1, "gamma": 2}
        kv.push(["gamma", "alpha"], [np.full(5, 0.25, np.float32), np.array([1, 2, 3]) * (rank + 1)])
        o1, o2 = np.empty(5, np.float32), np.empty(3, np.int64)
        kv.pull(["gamma", "alpha"], out=[o1, o2])
        assert (o1 == 0.5).all() and o2.tolist() == [3, 6, 9], (o1, o2)
        expect_raises(kvframe.errors.MixedKeyTypesError, kv.push, 1, np.zeros(5, np.float32))
        print("DONE")
    """)
    assert_ok(job)


def test_row_sparse_push_and_row_sparse_pull(tmp_path):
    job = run_job(tmp_path, """
        from kvframe import RowSparseArray
        shape = (1000, 4)                      # split over 2 servers (bound 1000)
        kv.init("emb", np.zeros(shape, np.float32))
        rows = np.array([1, 500, 999]) if rank == 0 else np.array([1, 2])
        data = np.ones((rows.size, 4), np.float32) * (rank + 1)
        kv.push("emb", RowSparseArray(data, rows, shape))
        kv.barrier()
        out = RowSparseArray.zeros(shape)
        kv.row_sparse_pull("emb", out=out, row_ids=np.array([999, 2, 1, 1, 3]))
        assert out.indices.tolist() == [1, 2, 3, 999], out.indices
        want = np.array([[3] * 4, [2] * 4, [0] * 4, [1] * 4], np.float32)
        assert np.array_equal(out.data, want), out.data
        dense = np.empty(shape, np.float32)
        kv.pull("emb", out=dense)
        assert dense.sum() == 4 * (3 + 2 + 1 + 1), dense.sum()
        print("DONE")
    """, env={"KVFRAME_BIGARRAY_BOUND": "1000"})
    assert_ok(job)


def test_row_sparse_pull_right_after_a_push_sees_that_round(tmp_path):
    """As a dense pull does (one of MXNet's own dist tests): no barrier between push and pull."""
    job = run_job(tmp_path, """
        shape = (3000, 4)                                   # split over both servers (bound 1000)
        kv.init("e", np.zeros(shape, np.float32))
        for r in range(1, 6):
            rows = np.array([0, 1, 1500, 2999], np.int64)
            g = kvframe.RowSparseArray(np.full((4, 4), r * (rank + 1), np.float32), rows, shape)
            kv.push("e", g)
            out = kvframe.RowSparseArray(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), shape)
            kv.row_sparse_pull("e", out=out, row_ids=np.array([2999, 0, 7], np.int64))
            assert list(out.indices) == [0, 7, 2999], out.indices
            assert (out.data[[0, 2]] == 3 * r).all() and (out.data[1] == 0).all(), (r, out.data)
        print("DONE")
    """, env={"KVFRAME_BIGARRAY_BOUND": "1000"})
    assert_ok(job)


REF_2BIT = """
def ref_2bit(grad, residual, t):
    # MXNet's 2bit quantizer with error feedback, element by element in float32
    r = residual + grad
    q = np.where(r >= t, np.float32(t), np.where(r <= -t, np.float32(-t), np.float32(0))).astype(np.float32)
    residual[...] = r - q
    return q
"""


@pytest.mark.skipif(not _have("compressors", "2bit"), reason="kvframe_compressors is not installed")
def test_2bit_over_the_wire_equals_reference_quantizer(tmp_path):
    job = run_job(tmp_path, REF_2BIT + textwrap.dedent("""
        n = 3001                                    # split over both servers, not a multiple of 16
        kv.init(0, np.zeros(n, np.float32))
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
        rng = np.random.default_rng(0)
        grads = [rng.standard_normal((4, n)).astype(np.float32) for _ in range(2)]   # per worker, 4 rounds
        res = [np.zeros(n, np.float32) for _ in range(2)]
        out = np.empty(n, np.float32)
        for r in range(4):
            kv.push(0, grads[rank][r])
            kv.pull(0, out=out)
            want = ref_2bit(grads[0][r], res[0], 0.5) + ref_2bit(grads[1][r], res[1], 0.5)
            assert np.array_equal(out, want), (r, np.abs(out - want).max())
        # the device store, with the two workers' gradients as two devices, gives the same
        if "device" in kvframe.plugins.names("stores"):
            dev = kvframe.create("device")
            dev.init(0, np.zeros(n, np.float32))
            dev.set_gradient_compression({"type": "2bit", "threshold": 0.5})
            d = np.empty(n, np.float32)
            for r in range(4):
                dev.push(0, [grads[0][r], grads[1][r]])
                dev.pull(0, out=d)
            assert np.array_equal(d, out), np.abs(d - out).max()
        stats = kv.backend.server_stats()
        assert all(json.loads(s["compression"])["type"] == "2bit" for s in stats)
        print("DONE")
    """), env={"KVFRAME_BIGARRAY_BOUND": "1000"})
    assert_ok(job)


@pytest.mark.skipif(not _have("compressors", "2bit"), reason="kvframe_compressors is not installed")
def test_pushpull_with_compression(tmp_path):
    job = run_job(tmp_path, REF_2BIT + textwrap.dedent("""
        kv.init([0, 1], [np.zeros(100, np.float32), np.zeros(20, np.float32)])
        kv.set_gradient_compression({"type": "2bit", "threshold": 1.0})
        res = [np.zeros(100, np.float32) for _ in range(2)]
        for r in range(3):
            gs = [np.linspace(-2, 2, 100).astype(np.float32) * (w + 1) for w in range(2)]
            out = np.empty(100, np.float32)
            kv.pushpull(0, gs[rank], out=out)
            want = ref_2bit(gs[0], res[0], 1.0) + ref_2bit(gs[1], res[1], 1.0)
            assert np.array_equal(out, want), (r, out, want)
        print("DONE")
    """))
    assert_ok(job)


@pytest.mark.skipif(not _have("compressors", "2bit"), reason="kvframe_compressors is not installed")
def test_compressed_pulls(tmp_path):
    job = run_job(tmp_path, REF_2BIT + textwrap.dedent("""
        n = 3001
        kv.init(0, np.zeros(n, np.float32))
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
        kv.set_optimizer("test")                             # w += the sum of the pushes
        rng = np.random.default_rng(1)
        grads = [rng.standard_normal((5, n)).astype(np.float32) for _ in range(2)]
        res = [np.zeros(n, np.float32) for _ in range(2)]
        out = np.empty(n, np.float32)
        mirror = None
        shards = [slice(0, 1500), slice(1500, n)]             # the plan's split over 2 servers
        compressed = 0
        w = np.zeros(n, np.float32)
        for r in range(5):
            kv.pushpull(0, grads[rank][r] * 0.3, out=out)
            w += ref_2bit(grads[0][r] * 0.3, res[0], 0.5) + ref_2bit(grads[1][r] * 0.3, res[1], 0.5)
            if mirror is None:
                mirror = w.copy()                            # the first pull carries the value
            else:
                for sl in shards:                            # one compressed step, or the value when it falls short
                    left = np.zeros(sl.stop - sl.start, np.float32)
                    step = ref_2bit(w[sl] - mirror[sl], left, 0.5)
                    if np.abs(left).max() <= 0.5:
                        mirror[sl] += step
                        compressed += 1
                    else:
                        mirror[sl] = w[sl]
            assert np.array_equal(out, mirror), (r, np.abs(out - mirror).max())
            assert np.abs(out - w).max() <= 0.5                # never more than one threshold behind
        assert compressed > 0                                 # pulls really were compressed
        print("DONE")
    """), env={"KVFRAME_BIGARRAY_BOUND": "1000", "KVOPTS": '{"compress_pulls": true}'})
    assert_ok(job)


@pytest.mark.skipif(not _have("compressors", "2bit"), reason="kvframe_compressors is not installed")
def test_compressed_pulls_never_drift_from_a_fast_moving_value(tmp_path):
    """The issue's case: a weight moving 1.0 per round (threshold 0.5) was pulled as 8 instead of 15
    after 15 rounds. Now every pull is within one threshold of the value (exact here)."""
    job = run_job(tmp_path, """
        kv.init("w", np.zeros(1000, np.float32))
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
        kv.set_optimizer("test")                             # w += the sum of the pushes
        out = np.empty(1000, np.float32)
        for r in range(1, 16):
            kv.push("w", np.full(1000, 0.5, np.float32))   # two workers: the sum moves 1.0 per round
            kv.pull("w", out=out)
            assert np.abs(out - r).max() <= 0.5, (r, out[:3])
        print("DONE", out[0])
        expect_raises(kvframe.errors.NotSupportedError, kv.set_gradient_compression, {"type": "fp16"},
                      match="compress_pulls=True needs a compressor with a positive threshold")
        print("DONE")
    """, env={"KVOPTS": '{"compress_pulls": true}'})
    assert_ok(job)
    assert "DONE 15.0" in job.lines("worker 0"), job.out


@pytest.mark.skipif(not _have("optimizers", "adam"), reason="kvframe_optimizers' adam is not installed")
def test_distributed_checkpoint_round_trip(tmp_path):
    ck, wfile, rfile = tmp_path / "states.bin", tmp_path / "weights.npz", tmp_path / "result.npz"
    train = """
        g = [np.linspace(0, 1, 3000).astype(np.float32), np.ones(7, np.float32) * (rank + 1)]
        outs = [np.empty(3000, np.float32), np.empty(7, np.float32)]
        def steps(k):
            for _ in range(k):
                kv.pushpull([0, 1], g, out=outs)
    """
    job = run_job(tmp_path, train + f"""
        kv.init([0, 1], [np.zeros(3000, np.float32), np.zeros(7, np.float32)])
        kv.set_optimizer("adam", learning_rate=0.01)
        steps(3)
        if rank == 0:
            kv.save_optimizer_states({str(ck)!r})
            np.savez({str(wfile)!r}, a=outs[0], b=outs[1])
        kv.barrier()
        steps(2)
        if rank == 0:
            np.savez({str(rfile)!r}, a=outs[0], b=outs[1])
        print("DONE")
    """, env={"KVFRAME_BIGARRAY_BOUND": "1000"})
    assert_ok(job)
    assert ck.read_bytes().startswith(b"KVFDIST1")
    job = run_job(tmp_path, train + f"""
        w = np.load({str(wfile)!r})
        kv.init([0, 1], [w["a"], w["b"]])
        kv.set_optimizer("adam", learning_rate=0.01)
        if rank == 0:
            kv.load_optimizer_states({str(ck)!r})
        kv.barrier()
        steps(2)
        want = np.load({str(rfile)!r})
        assert np.array_equal(outs[0], want["a"]) and np.array_equal(outs[1], want["b"]), (outs[1], want["b"])
        # without the states (fresh adam) the result differs: the states mattered
        print("DONE")
    """, env={"KVFRAME_BIGARRAY_BOUND": "1000"})
    assert_ok(job)


@pytest.mark.parametrize("transport, mac_data", [(t, "0") for t in TRANSPORTS] + [("shm", "1")])
def test_transports_with_a_shared_secret(tmp_path, transport, mac_data):
    job = run_job(tmp_path, """
        big = 700_000                                  # 2.8 MB: shared memory with 'shm'
        kv.init([0, 1], [np.zeros(big, np.float32), np.zeros(33, np.float64)])
        for r in range(3):
            outs = [np.empty(big, np.float32), np.empty(33, np.float64)]
            kv.pushpull([0, 1], [np.full(big, r + rank, np.float32), np.arange(33.0) * rank], out=outs)
            assert (outs[0] == 2 * r + 1).all() and np.array_equal(outs[1], np.arange(33.0)), r
        scheme = "plainpipe" if os.environ["KVFRAME_TRANSPORT"] == "plainpipe" else "tcp"
        assert kv.backend.server_addrs[0].startswith(scheme + "://"), kv.backend.server_addrs
        assert all(s["dropped"] == 0 and s["transport"] == os.environ["KVFRAME_TRANSPORT"]
                   for s in kv.backend.server_stats())
        print("DONE")
    """, env={"KVFRAME_SECRET": "k" * 32, "KVFRAME_TRANSPORT": transport, "KVFRAME_MAC_DATA": mac_data})
    assert_ok(job)


@pytest.mark.gpu
@pytest.mark.parametrize("kvtype", ["dist_sync", "dist_device_sync"])
def test_cupy_arrays(tmp_path, kvtype):
    job = run_job(tmp_path, """
        import cupy as cp
        kv.init(0, cp.zeros(1000, cp.float32))
        kv.push(0, [cp.full(1000, rank + 1.0, cp.float32), cp.full(1000, 1.0, cp.float32)])  # two devices' worth
        out = cp.empty(1000, cp.float32)
        kv.pull(0, out=out)
        assert bool((out == (1 + 1) + (2 + 1)).all()), out[:4]
        print("DONE")
    """, env={"KVTYPE": kvtype})
    assert_ok(job)


@pytest.mark.skipif(not _have("optimizers", "sgd"), reason="kvframe_optimizers' sgd is not installed")
def test_launch_with_a_config_file(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text('[store]\ntype = "dist_sync"\n[optimizer]\ntype = "sgd"\nlearning_rate = 0.1\n')
    job = run_job(tmp_path, f"""
        import os
        import numpy as np
        import kvframe
        assert os.environ["KVFRAME_CONFIG"] == {str(cfg)!r}
        kv = kvframe.create_from_config()              # reads KVFRAME_CONFIG, as kvframe-launch --config passes it
        assert kv.type == "dist_sync"
        kv.init(0, np.zeros(5, np.float32))
        out = np.empty(5, np.float32)
        kv.pushpull(0, np.ones(5, np.float32), out=out)
        assert np.allclose(out, -0.2) and out.dtype == np.float32, out
        print("DONE")
    """, prelude=False, launcher_args=("--config", str(cfg)))
    assert_ok(job)


@pytest.mark.skipif(not _have("optimizers", "sgd"), reason="kvframe_optimizers' sgd is not installed")
def test_async_with_big_split_arrays(tmp_path):
    job = run_job(tmp_path, """
        n = 1_200_000                                   # split over both servers; shards through shared memory
        kv.init("w", np.zeros(n, np.float32))
        kv.set_optimizer("sgd", learning_rate=0.25)
        g = np.ones(n, np.float32)
        for _ in range(4):
            kv.push("w", g)
        kv.barrier()
        out = np.empty(n, np.float32)
        kv.pull("w", out=out)
        assert (out == -2.0).all(), out[:4]             # 2 workers x 4 pushes x -0.25, each applied at once
        print("DONE")
    """, env={"KVTYPE": "dist_async"})
    assert_ok(job)
