"""CPU tests of store 'nccl': launcher variables, the unique-id rendezvous, id encoding, buckets, config."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from kvframe_nccl import buckets, cuda, rendezvous
from kvframe_nccl.launch_env import LaunchEnvError, detect_launch, parse_address, rendezvous_address

from kvframe.errors import ConfigError


# launcher variables ---------------------------------------------------------------------------
def test_no_launcher_means_single_process():
    assert detect_launch({}) is None
    assert detect_launch({"PATH": "/bin"}) is None


@pytest.mark.parametrize("env, want", [
    ({"KVFRAME_RANK": "2", "KVFRAME_WORLD_SIZE": "4", "KVFRAME_LOCAL_RANK": "0"}, (2, 4, 0, "KVFRAME")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, (1, 2, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3"},
     (3, 8, 3, "Open MPI")),
    ({"DMLC_ROLE": "worker", "DMLC_NUM_WORKER": "2", "DMLC_WORKER_ID": "1"}, (1, 2, None, "DMLC")),
    ({"DMLC_NUM_WORKER": "2", "DMLC_WORKER_ID": "0", "KVFRAME_LOCAL_RANK": "0"}, (0, 2, 0, "DMLC")),
    ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1, None, "torchrun")),
    # what kvframe-launch sets for worker 1 of 2 (local launcher)
    ({"KVFRAME_ROLE": "worker", "DMLC_ROLE": "worker", "KVFRAME_RANK": "1", "KVFRAME_NUM_WORKERS": "2",
      "DMLC_NUM_WORKER": "2", "DMLC_NUM_SERVER": "1"}, (1, 2, None, "KVFRAME")),
    # kvframe-launch --launcher mpi: the rank comes from MPI
    ({"KVFRAME_ROLE": "worker", "KVFRAME_RANK_FROM_MPI": "1", "KVFRAME_NUM_WORKERS": "4",
      "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     (3, 4, 1, "Open MPI")),
    ({"DMLC_ROLE": "worker", "DMLC_NUM_WORKER": "3", "KVFRAME_RANK": "2"}, (2, 3, None, "DMLC")),
])
def test_launcher_families(env, want):
    info = detect_launch(env)
    assert (info.rank, info.world_size, info.local_rank, info.source) == want


def test_kvframe_variables_win_over_torchrun():
    info = detect_launch({"KVFRAME_RANK": "1", "KVFRAME_WORLD_SIZE": "2", "RANK": "5", "WORLD_SIZE": "9"})
    assert (info.rank, info.world_size) == (1, 2)


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"KVFRAME_RANK": "1"}, "no world size"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank must lie in [0, 2)"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' must be an integer"),
    ({"KVFRAME_RANK": "0", "KVFRAME_WORLD_SIZE": "0"}, "at least 1"),
    ({"DMLC_NUM_WORKER": "2"}, "set KVFRAME_RANK"),
    ({"DMLC_ROLE": "server", "DMLC_NUM_WORKER": "2", "DMLC_WORKER_ID": "0"}, "worker processes only"),
    ({"KVFRAME_ROLE": "scheduler", "KVFRAME_NUM_WORKERS": "2"}, "KVFRAME_ROLE='scheduler'"),
])
def test_launcher_errors_name_the_variable(env, needle):
    with pytest.raises(LaunchEnvError, match=None) as err:
        detect_launch(env)
    assert needle in str(err.value)


def test_addresses():
    assert parse_address("10.0.0.1:29500") == ("10.0.0.1", 29500)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    assert parse_address(":7000") == ("127.0.0.1", 7000)
    for bad in ("nohost", "h:0", "h:70000", "h:x", "[::1]7000"):
        with pytest.raises(LaunchEnvError):
            parse_address(bad)
    assert rendezvous_address({}) is None
    assert rendezvous_address({"KVFRAME_NCCL_ADDR": "a:5", "MASTER_ADDR": "b", "MASTER_PORT": "9"}) == ("a", 5)
    assert rendezvous_address({"MASTER_ADDR": "b", "MASTER_PORT": "29500"}) == ("b", 29501)
    assert rendezvous_address({"MASTER_ADDR": "b", "MASTER_PORT": "29500", "KVFRAME_NCCL_PORT_OFFSET": "0"}) == \
        ("b", 29500)
    assert rendezvous_address({"DMLC_PS_ROOT_URI": "s", "DMLC_PS_ROOT_PORT": "9091"}) == ("s", 9092)
    assert rendezvous_address({"KVFRAME_ROOT_URI": "k", "KVFRAME_ROOT_PORT": "9000", "DMLC_PS_ROOT_URI": "s",
                               "DMLC_PS_ROOT_PORT": "9000"}) == ("k", 9001)
    with pytest.raises(LaunchEnvError, match="outside"):
        rendezvous_address({"MASTER_ADDR": "b", "MASTER_PORT": "65535"})


# unique-id encoding ---------------------------------------------------------------------------
def test_unique_id_bytes_and_signed_tuples_round_trip():
    raw = bytes(range(128))[::-1]
    raw = bytes((b * 7) % 256 for b in range(128))
    signed = cuda.uid_for_cupy(raw, "13.6.0")
    assert isinstance(signed, tuple) and len(signed) == 128 and min(signed) >= -128 and max(signed) <= 127
    assert cuda.uid_to_bytes(signed) == raw
    assert cuda.uid_for_cupy(raw, "14.2.0") == raw
    assert cuda.uid_to_bytes(raw) == raw
    with pytest.raises(ValueError, match="128 bytes"):
        cuda.uid_to_bytes(b"short")
    with pytest.raises(ValueError, match="128 bytes"):
        cuda.uid_for_cupy(b"x" * 127, "14")


def test_nccl_dtype_codes():
    assert cuda.nccl_dtype(np.float16) == 6
    assert cuda.nccl_dtype(np.float32) == 7
    assert cuda.nccl_dtype(np.float64) == 8
    assert cuda.nccl_dtype(np.int64) == 4
    with pytest.raises(TypeError, match="got dtype complex64"):
        cuda.nccl_dtype(np.complex64)
    with pytest.raises(TypeError, match="bool"):
        cuda.nccl_dtype(np.bool_)


# rendezvous -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world, port, uid=None, tokens=None, worlds=None, ranks=None, timeout=10.0):
    uid = uid or bytes(range(128))
    results, errors = {}, {}
    ranks = ranks or list(range(world))

    def run(i, r):
        try:
            w = worlds[i] if worlds else world
            tok = tokens[i] if tokens else None
            results[i] = rendezvous.exchange_unique_id(r, w, "127.0.0.1", port, lambda: uid, timeout, tok)
        except Exception as exc:  # collected for the test
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(ranks)]
    for t in reversed(threads):  # the clients start first and must retry until rank 0 listens
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return results, errors


def test_rendezvous_hands_the_raw_id_to_every_rank():
    uid = bytes((i * 13 + 5) % 256 for i in range(128))
    results, errors = _run_ranks(4, _free_port(), uid=uid)
    assert not errors
    assert all(results[i] == uid for i in range(4))


def test_rendezvous_world_size_one_needs_no_socket():
    assert rendezvous.exchange_unique_id(0, 1, "127.0.0.1", 1, lambda: b"\x01" * 128, 1.0) == b"\x01" * 128


def test_rendezvous_world_size_mismatch_is_refused_on_both_sides():
    results, errors = _run_ranks(2, _free_port(), worlds=[2, 3], timeout=5)
    assert "world size 3" in str(errors[0]) and "rank 0 with 2" in str(errors[0])
    assert "refused rank 1" in str(errors[1])


def test_rendezvous_duplicate_rank():
    results, errors = _run_ranks(3, _free_port(), ranks=[0, 1, 1], timeout=5)
    assert any("two processes were started with the same rank" in str(e) for e in errors.values())


def test_rendezvous_token_mismatch_keeps_strangers_out():
    port = _free_port()
    results, errors = _run_ranks(2, port, tokens=["secret", "wrong"], timeout=2)
    assert "secret (KVFRAME_SECRET) differs" in str(errors[1])
    assert isinstance(errors[0], rendezvous.RendezvousTimeout) and "ranks [1]" in str(errors[0])
    results, errors = _run_ranks(2, _free_port(), tokens=["secret", "secret"])
    assert not errors and results[0] == results[1]


def test_rendezvous_timeouts_name_what_was_waited_for():
    port = _free_port()
    with pytest.raises(rendezvous.RendezvousTimeout, match=r"rank 1 timed out after 0.5 s .*127.0.0.1:\d+"):
        rendezvous.fetch_unique_id(1, 2, "127.0.0.1", port, timeout=0.5)
    with pytest.raises(rendezvous.RendezvousTimeout, match=r"waiting for ranks \[1, 2\] of 3"):
        rendezvous.serve_unique_id(b"\0" * 128, 3, "127.0.0.1", port, timeout=0.5)


def test_rendezvous_ignores_garbage_and_rejects_a_wrong_server():
    port = _free_port()
    uid = b"\x07" * 128
    t = threading.Thread(target=rendezvous.serve_unique_id, args=(uid, 2, "127.0.0.1", port, 5.0))
    t.start()
    # a stray client sending junk must not break the exchange
    for _ in range(50):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 40)
            break
        except OSError:
            import time

            time.sleep(0.05)
    assert rendezvous.fetch_unique_id(1, 2, "127.0.0.1", port, timeout=5) == uid
    t.join(5)
    # a server that is not rank 0 of a kvframe-nccl job
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        conn.recv(100)
        conn.sendall(b"HTTP/1.0 400\r\n")
        conn.close()

    threading.Thread(target=answer).start()
    with pytest.raises(rendezvous.RendezvousError, match="not rank 0 of a kvframe-nccl job"):
        rendezvous.fetch_unique_id(1, 2, "127.0.0.1", srv.getsockname()[1], timeout=5)
    srv.close()


def test_rendezvous_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(rendezvous.RendezvousError, match="port is in use"):
            rendezvous.serve_unique_id(b"\0" * 128, 2, "127.0.0.1", s.getsockname()[1], timeout=1)


def test_wire_format_is_plain_fixed_bytes():
    hello = rendezvous.encode_hello(3, 8, "t")
    assert hello[:4] == b"KVFN" and len(hello) == 4 + 1 + 4 + 4 + 32
    assert rendezvous.decode_hello(hello)[:3] == (1, 3, 8)
    ok = rendezvous.encode_ok(b"\x01" * 128)
    assert ok == b"KVFN\x00" + b"\x01" * 128
    with pytest.raises(rendezvous.RendezvousError, match="not a kvframe-nccl peer"):
        rendezvous.decode_hello(b"X" * len(hello))


# buckets --------------------------------------------------------------------------------------
def test_plan_packs_small_keys_per_dtype_and_keeps_big_ones_alone():
    items = [("a", (10,), np.float32), ("b", (1000,), np.float32), ("c", (5, 2), np.float16),
             ("d", (3,), np.float32), ("e", (7,), np.float16), ("f", (), np.float32)]
    units = buckets.plan(items, bucket_bytes=1024, pack_threshold=64)
    described = [(u.dtype.name, [m.key for m in u.members], u.count) for u in units]
    assert described == [("float32", ["a", "d", "f"], 14), ("float32", ["b"], 1000), ("float16", ["c", "e"], 17)]
    a, d, f = units[0].members
    assert (a.offset, d.offset, f.offset) == (0, 10, 13) and f.shape == ()


def test_plan_closes_full_buckets_and_can_be_disabled():
    items = [(i, (16,), np.float32) for i in range(10)]  # 64 bytes each
    units = buckets.plan(items, bucket_bytes=256, pack_threshold=64)
    assert [len(u.members) for u in units] == [4, 4, 2]
    assert all(not u.packed for u in buckets.plan(items, bucket_bytes=0, pack_threshold=0))
    single = buckets.plan([("x", (4,), np.float32)], 256, 64)
    assert not single[0].packed


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64, np.uint8])
def test_pack_unpack_round_trip(dtype):
    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal(s) * 10).astype(dtype) for s in [(3, 4), (5,), (), (2, 1, 3)]]
    arrays[1] = np.asfortranarray(np.arange(10, dtype=dtype).reshape(2, 5))[:, ::2].T.copy()[::1]
    items = [(i, a.shape, a.dtype) for i, a in enumerate(arrays)]
    (unit,) = buckets.plan(items, 1 << 20, 1 << 20)
    flat = np.empty(unit.count, dtype)
    buckets.pack(np, arrays, flat)
    for v, a in zip(buckets.views(flat, unit), arrays):
        np.testing.assert_array_equal(v, a)
    outs = [np.zeros_like(a) for a in arrays]
    outs[0] = np.zeros((4, 3), dtype).T  # a non-contiguous output
    buckets.unpack(flat, unit, outs)
    for o, a in zip(outs, arrays):
        np.testing.assert_array_equal(o, a)


def test_pack_is_a_bit_copy_for_any_two_byte_type():
    # bfloat16 arrays (ml_dtypes) are copied through uint16 views: the bits stay exactly the same
    bits = np.array([0x3F80, 0xFFFF, 0x7FC1, 0x0001], np.uint16)
    items = [(0, (4,), np.uint16), (1, (4,), np.uint16)]
    (unit,) = buckets.plan(items, 64, 64)
    flat = np.empty(8, np.uint16)
    buckets.pack(np, [bits, bits[::-1]], flat)
    assert flat.tobytes() == bits.tobytes() + bits[::-1].tobytes()
    with pytest.raises(ValueError, match="packing 8 elements into a buffer of 9"):
        buckets.pack(np, [bits, bits], np.empty(9, np.uint16))


# config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, needle", [
    ({"devices": [0, 0]}, "distinct"),
    ({"devices": []}, "empty"),
    ({"devices": 0}, "at least 1"),
    ({"bucket_bytes": 100, "pack_threshold_bytes": 200}, "must not exceed bucket_bytes"),
    ({"rank": 1}, "rank and world_size together"),
    ({"rank": 2, "world_size": 2}, "below world_size"),
    ({"mode": "single", "rank": 0, "world_size": 2}, "mode 'single' has one process"),
    ({"mode": "multi", "devices": [0, 1]}, "one GPU per process"),
    ({"rendezvous": "nohost"}, "host:port"),
    ({"algorithm": "ring"}, "algorithm"),
    ({"bucket_bytes": -1}, "bucket_bytes"),
    ({"rendezvous_timeout": 0}, "rendezvous_timeout"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_bad_options_are_refused_before_any_gpu_is_touched(options, needle):
    import kvframe

    with pytest.raises(ConfigError) as err:
        kvframe.create("nccl", **options)
    assert needle in str(err.value)
