"""The wire format: every message between workers, servers and the scheduler is a typed record.

A message is a list of frames for the transport: ``[header, *data, mac?]``. The header is
``MAGIC + VERSION + JSON`` whose fields are checked against :data:`SCHEMA` by :func:`decode`
before any role sees them (unknown op, missing or extra field, wrong type, too large: the
message is refused with :class:`BadMessage`). Data frames are raw array bytes described by the
header; nothing is ever unpickled. With a shared secret the last frame is an HMAC-SHA256, under
the connection's session key (:mod:`kvframe_dist.session`), over the message's sequence number,
its header and the length of every data frame (and, with ``KVFRAME_MAC_DATA=1``, the data bytes
too: about 1 ms per MB on each side, so not by default); it is checked before the header is
parsed, so a forged, replayed or reordered message is refused before anything reads it.

Key shards travel as columns: ``keys`` (int key ids), ``parts`` (which shard of the key; absent
means all 0: whole keys) and, for pushes and compressed pulls, ``encs`` (absent means all
``"raw"``). :func:`items` builds them and :meth:`Message.items` reads them back, so both sides
share one definition.

| op | from -> to | fields | data frames |
|---|---|---|---|
| hello, hello_ack, refused | any -> any | nonce, role / nonce, echo / msg | (the session handshake) |
| register | node -> scheduler | role, addr, host, rank? | |
| welcome | scheduler -> node | rank, servers, num_workers, num_servers, pid | |
| hb | node <-> scheduler | role?, rank? | |
| barrier, barrier_done, bye | worker <-> scheduler | id | |
| closed | scheduler -> worker | rank, name | |
| dead | scheduler -> node | role, rank, addr, msg | |
| stop | scheduler -> server | | |
| init | worker -> server | id, keys, parts, dtypes, shapes, names | one value per item |
| push | worker -> server | id, keys, parts?, encs?, sync, prio? | raw, ``c:DTYPE``: 1; rsp: rows, data |
| pull | worker -> server | id, keys, parts?, sync, prio?, cpull? | |
| pushpull | worker -> server | the fields of push, cpull? | as push |
| rsp_pull | worker -> server | id, keys, parts? | one int64 row-id frame per item |
| data | server -> worker | id, encs? | one per item |
| set_optimizer, set_compression | worker -> server | id, config (JSON text) | |
| get_states / set_states | worker -> server | id, dump? | set_states: 1 |
| command | worker -> server | id, head, body | |
| ping, stats | worker -> server | id | |
| ok | server -> worker | id, stats? | |
| error | any -> any | id?, msg | |
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Sequence
from typing import Any

MAGIC = b"KVF"
VERSION = 2
MAX_HEADER = 1 << 20  # bytes of JSON: a header never needs more (a million-key call is split by the worker)
MAX_ITEMS = 1 << 17  # key shards in one message
MAX_TEXT = 1 << 16  # characters of one string field (configs, error messages)
MAC_BYTES = 32


class BadMessage(Exception):
    """A message that is malformed, of another version or unauthenticated; the receiver drops it."""


# field types: a Python type, a tuple of alternatives, or one of these list markers
INTS, STRS, SHAPES, NAMES, JSON_OBJ = "list[int]", "list[str]", "list[list[int]]", "list[str|None]", "object"

SCHEMA: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # op: (required fields, optional fields)
    "hello": ({"nonce": str, "role": str, "mac_data": bool}, {}),
    "hello_ack": ({"nonce": str, "echo": str}, {}),
    "refused": ({"msg": str}, {}),
    "register": ({"role": str, "addr": str, "host": str}, {"rank": int}),
    "welcome": ({"rank": int, "servers": STRS, "num_workers": int, "num_servers": int, "pid": int}, {}),
    "hb": ({}, {"role": str, "rank": int}),
    "barrier": ({"id": int}, {}),
    "barrier_done": ({"id": int}, {}),
    "bye": ({"id": int}, {"role": str, "rank": int}),
    "closed": ({"rank": int, "name": str}, {}),
    "dead": ({"role": str, "rank": int, "addr": str, "msg": str}, {}),
    "stop": ({}, {}),
    "init": ({"id": int, "keys": INTS, "parts": INTS, "dtypes": STRS, "shapes": SHAPES, "names": NAMES}, {}),
    "push": ({"id": int, "keys": INTS, "sync": bool}, {"parts": INTS, "encs": STRS, "prio": int}),
    "pull": ({"id": int, "keys": INTS, "sync": bool}, {"parts": INTS, "prio": int, "cpull": bool}),
    "pushpull": ({"id": int, "keys": INTS, "sync": bool}, {"parts": INTS, "encs": STRS, "prio": int, "cpull": bool}),
    "rsp_pull": ({"id": int, "keys": INTS, "sync": bool}, {"parts": INTS}),
    "data": ({"id": int}, {"encs": STRS}),
    "set_optimizer": ({"id": int, "config": str}, {}),
    "set_compression": ({"id": int, "config": str}, {}),
    "get_states": ({"id": int}, {"dump": bool}),
    "set_states": ({"id": int}, {}),
    "command": ({"id": int, "head": int, "body": str}, {}),
    "ping": ({"id": int}, {}),
    "stats": ({"id": int}, {}),
    "ok": ({"id": int}, {"stats": JSON_OBJ}),
    "error": ({"msg": str}, {"id": int}),
}

_LISTS = {INTS: int, STRS: str}


def _check(op: str, name: str, value: Any, kind: Any) -> None:
    """Raise BadMessage unless ``value`` has the field's type (bool is not an int here)."""
    ok: bool
    if kind is int:
        ok = type(value) is int
    elif kind is str:
        ok = type(value) is str and len(value) <= MAX_TEXT
    elif kind is bool:
        ok = type(value) is bool
    elif kind in _LISTS:
        t = _LISTS[kind]
        ok = type(value) is list and len(value) <= MAX_ITEMS and all(type(v) is t for v in value)
    elif kind == SHAPES:
        ok = type(value) is list and len(value) <= MAX_ITEMS and all(
            type(s) is list and len(s) <= 32 and all(type(d) is int and d >= 0 for d in s) for s in value)
    elif kind == NAMES:
        ok = type(value) is list and len(value) <= MAX_ITEMS and all(v is None or type(v) is str for v in value)
    elif kind == JSON_OBJ:
        ok = type(value) is dict
    else:  # pragma: no cover - a schema typo
        raise AssertionError(kind)
    if not ok:
        raise BadMessage(f"{op!r} message: field {name!r} has the wrong type or size ({str(value)[:60]!r})")


class Message:
    """One decoded (or to-be-encoded) message: ``op``, its header fields, its data frames."""

    __slots__ = ("op", "fields", "frames")

    def __init__(self, op: str, fields: dict[str, Any] | None = None, frames: Sequence[Any] = ()):
        self.op = op
        self.fields = fields if fields is not None else {}
        self.frames = list(frames)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def id(self) -> int | None:
        return self.fields.get("id")

    def items(self) -> list[tuple[int, int, str]]:
        """The key shards of an init/push/pull message as ``(key, part, enc)``."""
        keys = self.fields["keys"]
        n = len(keys)
        parts = self.fields.get("parts") or [0] * n
        encs = self.fields.get("encs") or ["raw"] * n
        if len(parts) != n or len(encs) != n:
            raise BadMessage(f"{self.op!r} message: {n} keys but {len(parts)} parts and {len(encs)} encodings")
        return list(zip(keys, parts, encs))

    def __repr__(self) -> str:
        return f"Message({self.op!r}, {self.fields!r}, {len(self.frames)} frames)"


def items(fields: dict[str, Any], shards: Sequence[tuple[int, int, str]]) -> dict[str, Any]:
    """Add ``(key, part, enc)`` shards to a header as columns, leaving out all-default columns."""
    fields["keys"] = [k for k, _, _ in shards]
    if any(p for _, p, _ in shards):
        fields["parts"] = [p for _, p, _ in shards]
    if any(e != "raw" for _, _, e in shards):
        fields["encs"] = [e for _, _, e in shards]
    return fields


def _mac(key: bytes, seq: int, frames: Sequence[Any], data: bool = False) -> bytes:
    """HMAC over the sequence number, the frame lengths, the header, and with ``data`` every frame."""
    views = [memoryview(f).cast("B") for f in frames]
    h = hmac.new(key, struct.pack(f"<Q{len(views)}Q", seq, *(v.nbytes for v in views)), digestmod=hashlib.sha256)
    for v in views if data else views[:1]:
        h.update(v)
    return h.digest()


def encode(msg: Message, key: bytes | None = None, seq: int = 0, data: bool = False) -> list[Any]:
    """The frames of ``msg`` for a transport (data frames are passed through without a copy); with a
    key, the MAC over ``seq`` and the frames is the last frame."""
    header = MAGIC + bytes([VERSION]) + json.dumps({"op": msg.op, **msg.fields}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER:
        raise ValueError(f"a {msg.op!r} message header of {len(header)} bytes exceeds {MAX_HEADER}: split the call")
    frames = [header, *msg.frames]
    if key is not None:
        frames.append(_mac(key, seq, frames, data))
    return frames


def decode(frames: Sequence[Any], key: bytes | None = None, seq: int = 0, data: bool = False) -> Message:
    """A checked :class:`Message` from received frames; :class:`BadMessage` for anything else (with a
    key: also a MAC that is not over ``seq``, the message expected next)."""
    if not frames:
        raise BadMessage("empty message")
    if key is not None:
        if len(frames) < 2:
            raise BadMessage("unauthenticated message: no MAC frame")
        mac = bytes(frames[-1])
        frames = frames[:-1]
        if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, _mac(key, seq, frames, data)):
            raise BadMessage("unauthenticated message: bad MAC (a wrong or missing KVFRAME_SECRET, or a replayed "
                             "or reordered message)")
    head = memoryview(frames[0]).cast("B")
    if head.nbytes > MAX_HEADER:
        raise BadMessage(f"header of {head.nbytes} bytes exceeds {MAX_HEADER}")
    if head[:len(MAGIC)] != MAGIC:
        raise BadMessage(f"not a kvframe message (starts with {bytes(head[:8])!r})")
    if head.nbytes <= len(MAGIC) or head[len(MAGIC)] != VERSION:
        got = head[len(MAGIC)] if head.nbytes > len(MAGIC) else None
        raise BadMessage(f"wire version {got} is not this kvframe's {VERSION}: every node of a job must run the "
                         "same kvframe version")
    try:
        fields = json.loads(bytes(head[len(MAGIC) + 1:]))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadMessage(f"header is not JSON: {type(exc).__name__}") from None
    if type(fields) is not dict:
        raise BadMessage("header is not a JSON object")
    op = fields.pop("op", None)
    spec = SCHEMA.get(op) if type(op) is str else None
    if spec is None:
        raise BadMessage(f"unknown op {str(op)[:40]!r}")
    required, optional = spec
    for name, kind in required.items():
        if name not in fields:
            raise BadMessage(f"{op!r} message without field {name!r}")
        _check(op, name, fields[name], kind)
    for name, value in fields.items():
        kind = required.get(name) or optional.get(name)
        if kind is None:
            raise BadMessage(f"{op!r} message with unknown field {name[:40]!r}")
        if name not in required:
            _check(op, name, value, kind)
    return Message(op, fields, frames[1:])
