"""Transport ``zmq``: messages are a small JSON header frame plus raw array frames, on pyzmq.

A message on the wire is ``[header, frame_1, ..., frame_n]`` and, when a shared secret is set,
one more frame: the HMAC-SHA256 of every other frame (length-prefixed).  The header is
``b"KVF1" + JSON``; arrays travel as their raw bytes, described by the header (dtype, count).
Nothing received is ever unpickled.  Frames of at least ``zero_copy_bytes`` are sent without a
copy (the caller keeps the buffer alive until the returned tracker is done); received frames are
zero-copy views of zmq's buffers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import struct
from typing import Literal

import zmq
from pydantic import Field

from kvframe.config import TransportConfig

log = logging.getLogger("kvframe_dist")

MAGIC = b"KVF1"
MAX_HEADER = 16 << 20


class BadMessage(Exception):
    """A message that is malformed or fails authentication; the receiver drops it."""


class ZmqConfig(TransportConfig):
    type: Literal["zmq"] = "zmq"
    io_threads: int = Field(1, ge=1, le=16, description="zmq I/O threads per process")
    zero_copy_bytes: int = Field(65536, ge=0, description="frames of at least this size are sent without a copy")
    hwm: int = Field(0, ge=0, description="zmq high-water mark in messages (0: unlimited)")


class Part:
    """A data frame that travelled packed with others: the same reading interface as zmq.Frame."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: memoryview):
        self.buffer = buffer

    @property
    def bytes(self) -> bytes:
        return self.buffer.tobytes()

    def __len__(self) -> int:
        return self.buffer.nbytes


def _mac(secret: bytes, frames: list) -> bytes:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for f in frames:
        mv = memoryview(f.buffer if isinstance(f, zmq.Frame) else f).cast("B")
        h.update(struct.pack("<Q", mv.nbytes))
        h.update(mv)
    return h.digest()


class ZmqTransport:
    """Makes sockets and moves messages. One per process; sockets belong to one thread each."""

    def __init__(self, config: ZmqConfig | None = None, secret: bytes | None = None):
        self.config = config or ZmqConfig()
        self.secret = secret
        self.ctx = zmq.Context(io_threads=self.config.io_threads)

    def with_secret(self, secret: bytes | None) -> ZmqTransport:
        self.secret = secret
        return self

    def _opts(self, sock: zmq.Socket) -> zmq.Socket:
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        return sock

    def router(self, addr: str) -> tuple[zmq.Socket, str]:
        """A ROUTER bound at ``addr`` (``tcp://host:0`` picks a free port); returns it and the bound address."""
        sock = self._opts(self.ctx.socket(zmq.ROUTER))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if addr.startswith("tcp://") and addr.endswith(":0"):
            port = sock.bind_to_random_port(addr[:-2])
            return sock, f"{addr[:-2]}:{port}"
        sock.bind(addr)
        return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def dealer(self, addr: str, identity: bytes | None = None) -> zmq.Socket:
        sock = self._opts(self.ctx.socket(zmq.DEALER))
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(addr)
        return sock

    # messages ---------------------------------------------------------------------------------
    def send(self, sock: zmq.Socket, header: dict, frames: list | tuple = (), ident: bytes | None = None,
             track: bool = False) -> list:
        """Send one message; with ``track`` returns the MessageTrackers of its zero-copy frames (the
        caller must keep those buffers unchanged until they are done)."""
        zc = self.config.zero_copy_bytes
        if len(frames) > 1:  # small frames travel packed in one frame; the header says where
            views = [memoryview(f).cast("B") for f in frames]
            small = [v for v in views if v.nbytes < zc]
            if len(small) > 1:
                header = {**header, "_p": [v.nbytes if v.nbytes < zc else -1 for v in views]}
                frames = [b"".join(small), *(f for f, v in zip(frames, views) if v.nbytes >= zc)]
        hdr = MAGIC + json.dumps(header, separators=(",", ":")).encode()
        parts: list = [hdr, *frames]
        if self.secret is not None:
            parts.append(_mac(self.secret, parts))
        if ident is not None:
            parts.insert(0, ident)
        n = len(parts)
        trackers = []
        for i, part in enumerate(parts):
            flags = zmq.SNDMORE if i < n - 1 else 0
            if isinstance(part, (bytes, zmq.Frame)) or memoryview(part).nbytes < zc:
                sock.send(part, flags, copy=True)
            else:
                frame = zmq.Frame(part, copy=False, track=track)
                sock.send(frame, flags, copy=False)
                if track:
                    trackers.append(frame.tracker)
        return trackers

    def recv(self, sock: zmq.Socket, router: bool = False) -> tuple[bytes | None, dict, list]:
        """Receive one message: (sender identity for a ROUTER, header dict, data frames as zmq.Frame).
        Raises BadMessage for anything malformed or unauthenticated (the message is consumed)."""
        parts = sock.recv_multipart(copy=False)
        ident = None
        if router:
            if len(parts) < 2:
                raise BadMessage("message without an envelope")
            ident = parts[0].bytes
            parts = parts[1:]
        if self.secret is not None:
            if len(parts) < 2:
                raise BadMessage(f"unauthenticated message from {ident!r}: no MAC frame")
            mac = parts[-1].bytes
            parts = parts[:-1]
            if len(mac) != 32 or not hmac.compare_digest(mac, _mac(self.secret, parts)):
                raise BadMessage(f"unauthenticated message from {ident!r}: bad MAC (wrong or missing KVFRAME_SECRET)")
        hdr = parts[0]
        if len(hdr) > MAX_HEADER:
            raise BadMessage(f"header of {len(hdr)} bytes is too large")
        raw = hdr.bytes
        if not raw.startswith(MAGIC):
            raise BadMessage(f"message from {ident!r} does not start with {MAGIC!r}")
        try:
            header = json.loads(raw[len(MAGIC):])
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadMessage(f"message from {ident!r} has a header that is not JSON: {exc}") from None
        if not isinstance(header, dict) or not isinstance(header.get("op"), str):
            raise BadMessage(f"message from {ident!r} has a header without an 'op'")
        data = parts[1:]
        layout = header.pop("_p", None)
        if layout is not None:
            data = self._unpack(layout, data, ident)
        return ident, header, data

    @staticmethod
    def _unpack(layout: object, data: list, ident: bytes | None) -> list:
        if not isinstance(layout, list) or not data or not all(type(n) is int and n >= -1 for n in layout):
            raise BadMessage(f"message from {ident!r} has a malformed frame layout")
        blob = data[0].buffer
        big = iter(data[1:])
        out: list = []
        off = 0
        try:
            for n in layout:
                if n < 0:
                    out.append(next(big))
                else:
                    out.append(Part(blob[off:off + n]))
                    off += n
        except StopIteration:
            raise BadMessage(f"message from {ident!r}: its frame layout names more frames than came") from None
        if off != blob.nbytes or next(big, None) is not None:
            raise BadMessage(f"message from {ident!r}: its frame layout does not match its frames")
        return out

    def close(self) -> None:
        self.ctx.destroy(linger=1000)


def make_transport(config: ZmqConfig) -> ZmqTransport:
    """The plugin factory: a transport built from a validated config."""
    return ZmqTransport(config)
