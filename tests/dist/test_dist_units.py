"""Pieces of the dist stores tested in-process: sharding, the wire format, the round table,
priorities, state files."""

from __future__ import annotations

import numpy as np
import pytest
from kvframe_dist.rounds import RoundTable, Slot
from kvframe_dist.server import by_priority
from kvframe_dist.sharding import plan, wire_dtype
from kvframe_dist.states import pack_states, unpack_states
from kvframe_dist.wire import MAX_HEADER, BadMessage, Message, decode, encode, items


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
    def m(prio, n):
        return Message("pull", {"prio": prio, "id": n})
    msgs = [("w0", m(0, 1)), ("w1", m(5, 2)), ("w0", m(9, 3)), ("w2", m(0, 4)), ("w2", m(7, 5))]
    assert [msg["id"] for _, msg in by_priority(msgs)] == [2, 1, 3, 4, 5]
    plain = [("w0", m(0, i)) for i in range(3)]
    assert by_priority(plain) == plain


# the wire format ---------------------------------------------------------------------------------
def test_messages_round_trip_with_columns_and_raw_frames():
    data = [np.arange(5, dtype=np.float32), np.ones(3, np.int64)]
    msg = Message("push", items({"id": 7, "sync": True}, [(3, 0, "raw"), (4, 1, "c:uint8")]), data)
    frames = encode(msg, b"secret")
    assert frames[1] is data[0]  # arrays are passed through, not copied
    got = decode([bytes(memoryview(f).cast("B")) for f in frames], b"secret")
    assert got.op == "push" and got.items() == [(3, 0, "raw"), (4, 1, "c:uint8")] and got["sync"] is True
    assert np.array_equal(np.frombuffer(got.frames[0], np.float32), data[0])
    whole = encode(Message("pull", items({"id": 1, "sync": True}, [(k, 0, "raw") for k in range(100)])))
    assert b"parts" not in whole[0] and b"encs" not in whole[0]  # all-default columns stay out


@pytest.mark.parametrize("header, reason", [
    (b"KVF\x02" + b"[" * 100_000, "not JSON"),  # a recursion bomb
    (b"KVF\x01{}", "wire version 1"),
    (b"XYZ\x02{}", "not a kvframe message"),
    (b'KVF\x02{"op": "push", "id": 1, "keys": [1], "sync": 1}', "sync"),  # 1 is no bool
    (b'KVF\x02{"op": "push", "id": 1, "keys": [true], "sync": true}', "keys"),
    (b'KVF\x02{"op": "push", "id": 1, "keys": [1], "sync": true, "ack": 1}', "unknown field"),
    (b'KVF\x02{"op": "pull", "keys": [1], "sync": true}', "without field 'id'"),
    (b'KVF\x02{"op": "exec", "id": 1}', "unknown op"),
    (b'KVF\x02{"op": "init", "id": 1, "keys": [1], "parts": [0], "dtypes": ["float32"], "shapes": [[-1]], '
     b'"names": [null]}', "shapes"),
    (b"KVF\x02" + b" " * (MAX_HEADER + 1), "exceeds"),
])
def test_malformed_headers_are_refused_with_the_reason(header, reason):
    with pytest.raises(BadMessage, match=reason):
        decode([header])


def test_a_message_without_the_right_mac_is_refused_before_parsing():
    frames = encode(Message("ping", {"id": 1}), b"right")
    with pytest.raises(BadMessage, match="bad MAC"):
        decode(frames, b"wrong")
    with pytest.raises(BadMessage, match="no MAC"):
        decode(frames[:1], b"right")
    assert decode(frames, b"right")["id"] == 1


def test_the_mac_binds_sequence_header_and_frame_lengths_and_with_data_the_bytes():
    key = b"k" * 32
    msg = Message("push", {"id": 1, "keys": [3], "sync": True}, [np.arange(4, dtype=np.float32)])
    frames = [bytes(memoryview(f).cast("B")) for f in encode(msg, key, seq=5)]
    assert decode(frames, key, seq=5)["id"] == 1
    for bad in (lambda f: decode(f, key, seq=4), lambda f: decode(f, key, seq=6),        # replayed, skipped
                lambda f: decode([f[0].replace(b'"id":1', b'"id":2'), *f[1:]], key, seq=5),  # header
                lambda f: decode([f[0], f[1] + b"\0" * 4, f[2]], key, seq=5)):            # a frame's length
        with pytest.raises(BadMessage, match="bad MAC"):
            bad(frames)
    tampered = [frames[0], b"\xff" * 16, frames[2]]   # same length, other bytes: only the data MAC sees it
    assert decode(tampered, key, seq=5).op == "push"
    full = [bytes(memoryview(f).cast("B")) for f in encode(msg, key, seq=5, data=True)]
    with pytest.raises(BadMessage, match="bad MAC"):
        decode([full[0], b"\xff" * 16, full[2]], key, seq=5, data=True)


def test_columns_of_different_lengths_are_refused():
    msg = decode(encode(Message("pull", {"id": 1, "sync": True, "keys": [1, 2], "parts": [0]})))
    with pytest.raises(BadMessage, match="2 keys but 1 parts"):
        msg.items()


# the round table ---------------------------------------------------------------------------------
def test_a_sync_round_completes_with_every_workers_push_and_releases_waiting_replies():
    applied, answered = [], []
    table = RoundTable(2, lambda slot: applied.append(sum(slot.pending)))
    a, b = Slot("a", None), Slot("b", None)
    table.push(a, "w0", 1, sync=True)
    table.after_round("w0", [a, b], lambda: answered.append("w0"))  # waits for a's round only
    table.after_round("w1", [a], lambda: answered.append("w1"))  # w1 pushed nothing: at once
    assert applied == [] and answered == ["w1"]
    table.push(a, "w0", 10, sync=True)  # a second push of one worker counts, as in MXNet
    assert applied == [11] and answered == ["w1", "w0"] and a.pending == [] and a.pushers == []


def test_async_pushes_complete_at_once_and_a_failed_update_still_closes_the_round():
    def boom(slot):
        raise RuntimeError("optimizer failed")
    table = RoundTable(3, boom)
    s = Slot("k", None)
    table.push(s, "w0", 1, sync=True)
    table.push(s, "w1", 1, sync=True)
    answered = []
    table.after_round("w0", [s], lambda: answered.append(1))
    with pytest.raises(RuntimeError):
        table.push(s, "w2", 1, sync=True)
    assert answered == [1] and s.pending == []
    done = []
    RoundTable(3, lambda slot: done.append(slot.pending[:])).push(Slot("k", None), "w0", 5, sync=False)
    assert done == [[5]]
