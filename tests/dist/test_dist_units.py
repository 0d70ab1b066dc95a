"""Pieces of the dist stores tested in-process: sharding, the wire format, priorities, state files."""

from __future__ import annotations

import numpy as np
import pytest
from kvframe_dist.proto import pack_states, plan, unpack_states, wire_dtype
from kvframe_dist.server import by_priority
from kvframe_dist.transport import BadMessage, ZmqTransport


def test_small_arrays_go_whole_to_one_server_as_mxnet():
    for key in (0, 1, 7, 12345):
        (sh,) = plan(key, (10, 3), 4, 1000)
        assert sh.server == (key * 9973) % 4 and (sh.lo, sh.hi) == (0, 30) and sh.shape == (10, 3)


def test_big_arrays_split_into_contiguous_row_ranges_over_all_servers():
    shards = plan(5, (1_000_001,), 3, 1_000_000)
    assert [s.server for s in shards] == [0, 1, 2]
    assert [(s.lo, s.hi) for s in shards] == [(0, 333334), (333334, 666667), (666667, 1_000_001)]
    rows = plan(5, (7, 1000), 2, 1000)            # split by rows: round(3.5) = 4 rows, then 3
    assert [(s.row_lo, s.row_hi, s.lo, s.hi, s.shape) for s in rows] == [(0, 4, 0, 4000, (4, 1000)),
                                                                         (4, 7, 4000, 7000, (3, 1000))]
    assert len(plan(5, (1, 5000), 2, 1000)) == 1  # one row cannot be split


def test_only_plain_numeric_dtypes_travel():
    assert wire_dtype("float32") == np.float32
    for bad in ("object", "complex64", "V8", 3, None, "<f4"):
        with pytest.raises(ValueError):
            wire_dtype(bad)


def test_state_files_round_trip_and_refuse_garbage():
    data = pack_states([b"abc", b"", b"x" * 10], {"store": "dist"})
    meta, blobs = unpack_states(data)
    assert blobs == [b"abc", b"", b"x" * 10] and meta["servers"] == 3
    for bad in (b"", b"PK\x03\x04", data[:-1], data + b"!"):
        with pytest.raises(ValueError):
            unpack_states(bad)


def test_priority_orders_each_workers_next_request_but_keeps_a_workers_order():
    msgs = [(b"w0", {"op": "pull", "prio": 0, "n": 1}, []), (b"w1", {"op": "pull", "prio": 5, "n": 2}, []),
            (b"w0", {"op": "pull", "prio": 9, "n": 3}, []), (b"w2", {"op": "push", "n": 4}, []),
            (b"w2", {"op": "push", "prio": 7, "n": 5}, [])]
    assert [h["n"] for _, h, _ in by_priority(msgs)] == [2, 1, 3, 4, 5]
    plain = [(b"w0", {"op": "pull", "n": i}, []) for i in range(3)]
    assert by_priority(plain) == plain


@pytest.fixture
def pair():
    a, b = ZmqTransport(secret=b"s"), ZmqTransport(secret=b"s")
    router, addr = a.router("tcp://127.0.0.1:0")
    dealer = b.dealer(addr)
    yield a, router, b, dealer
    router.close(0)
    dealer.close(0)
    a.close()
    b.close()


def test_frames_travel_packed_and_authenticated(pair):
    a, router, b, dealer = pair
    arrays = [np.arange(5, dtype=np.float32), np.ones(200_000, np.float64), np.arange(3, dtype=np.int64)]
    b.send(dealer, {"op": "x", "id": 1}, arrays)
    assert router.poll(5000)
    ident, h, frames = a.recv(router, router=True)
    assert h == {"op": "x", "id": 1} and len(frames) == 3
    got = [np.frombuffer(f.buffer, a_.dtype) for f, a_ in zip(frames, arrays)]
    assert all(np.array_equal(x, y) for x, y in zip(got, arrays))
    dealer.send_multipart([b"KVF1{\"op\":\"x\"}", b"no-mac"])  # unauthenticated
    assert router.poll(5000)
    with pytest.raises(BadMessage, match="unauthenticated"):
        a.recv(router, router=True)


def test_a_forged_frame_layout_is_refused(pair):
    a, router, b, dealer = pair
    b.send(dealer, {"op": "x", "_p": [4, 4]}, [b"1234"])  # says two packed frames, carries one
    assert router.poll(5000)
    with pytest.raises(BadMessage, match="layout"):
        a.recv(router, router=True)
