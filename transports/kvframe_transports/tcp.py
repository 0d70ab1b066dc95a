"""Transport ``tcp``: messages as length-prefixed frames on plain TCP sockets.

Wire format of one message (all integers little-endian)::

    prefix   12 bytes   magic b"KVFT", version (u8, 1), kind (u8: 0 data, 1 control), reserved (u16, 0),
                        number of frames n (u32, 1 <= n <= max_frames)
    lengths  8*n bytes  each frame's length (u64); the top bit marks a frame that travels in shared
                        memory (transport 'shm' only: its stream bytes are 16-byte chunk descriptors)
    frames              the frames' bytes, back to back

The receiver checks the prefix and the lengths before it allocates anything: a bad magic or version,
too many frames, or a message over ``max_message_bytes`` drops that connection (with a warning that
names the peer) and the endpoint serves on.  On an accepted connection the first data message (the
peer's handshake, before anyone trusts it) must fit ``max_first_message_bytes``, and nothing after
it is read until ``recv`` has handed it out: while it waits in the queue, an unauthenticated peer
cannot make this endpoint buffer anything more, and once the application has it, it can
``disconnect`` a peer that fails authentication.  A message is read into one buffer of its total
size and its frames come out of ``recv`` as memoryview slices of it.  Sending hands the caller's
buffers to the kernel with ``sendmsg`` (scatter-gather, no concatenation) and returns once all of
it is there.

One background thread per endpoint reads every connection (selectors), so two endpoints sending each
other large messages at once never deadlock: both keep reading while they write.  When the messages
waiting for ``recv`` hold more than ``max_queued_bytes``, that thread stops reading connections (it
still accepts new ones) until ``recv`` has taken them down to half of it; senders then wait, as for
any slow reader.  A message larger than the bound still comes through, on its own.  The thread
never blocks on a send, so this bound adds no deadlock between endpoints that each receive.
Warnings a peer can cause are rate-limited: the first 20 of a kind, then one in 1000, with a count.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from kvframe import hookimpl
from kvframe.config import TransportConfig
from kvframe.errors import TransportError
from kvframe.protocols import Frame, Frames
from kvframe_transports.addresses import byte_view, format_address, parse_address

log = logging.getLogger("kvframe_transports")

MAGIC = b"KVFT"
VERSION = 1
DATA, CONTROL = 0, 1
PREFIX = struct.Struct("<4sBBHI")
MARKER = struct.Struct("<QQ")  # a shared-memory chunk: its position in the ring, its length
SHM_FLAG = 1 << 63
MAX_CONTROL_BYTES = 1 << 16
MAX_CONTROL_FRAMES = 8  # the largest control message (shm's accept) has 5
STAGING_BYTES = 256 << 10  # small reads go through this buffer; large frames are read in place
DIRECT_BYTES = 64 << 10  # a frame part at least this long is received straight into the message
READS_PER_WAKE = 16  # then the receiver thread looks at the other connections again
ACCEPT_REST = 0.1  # seconds a listener rests after accept() failed (out of descriptors): no busy loop
LOG_FIRST, LOG_EVERY = 20, 1000  # warnings a peer can cause: the first ones, then one in this many
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# Linux's value where the socket module does not name it; linear RTOs help thin request/reply flows
TCP_THIN_LINEAR_TIMEOUTS = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16 if sys.platform == "linux" else None)
# Linux 6.15+: a per-socket floor for the retransmission timeout (the kernel's is 200 ms)
TCP_RTO_MIN_US = getattr(socket, "TCP_RTO_MIN_US", 45 if sys.platform == "linux" else None)



class TcpOptions(TransportConfig):
    """Socket options shared by 'tcp' and 'shm'."""

    max_frames: int = Field(1 << 16, ge=1, le=1 << 20, description="a message with more frames is refused")
    socket_buffer_bytes: int | None = Field(
        None, ge=4096, le=1 << 30, description="SO_SNDBUF and SO_RCVBUF; None keeps the kernel's autotuning")
    keepalive: bool = Field(True, description="TCP keepalive, so that a vanished host is noticed")
    thin_linear_timeouts: bool = Field(
        True, description="TCP_THIN_LINEAR_TIMEOUTS where the kernel has it: no exponential backoff of "
        "retransmissions for thin request/reply flows under packet loss")
    rto_min_ms: float | None = Field(
        10.0, gt=0, le=200, description="the retransmission timeout's floor where the kernel allows it per socket "
        "(TCP_RTO_MIN_US, Linux 6.15+): a lost packet of a small request costs this instead of 200 ms; None keeps "
        "the kernel's")


class TcpConfig(TcpOptions):
    type: Literal["tcp"] = "tcp"


class ProtocolError(Exception):
    """A peer broke the wire format or a limit; its connection is dropped."""


class Peer:
    """The handle of one connection. Hashable by identity; ``address`` is the remote end."""

    # why the connection broke lives here, not in a table of the endpoint: a flood of connections
    # leaves nothing behind once their handles are dropped
    __slots__ = ("address", "outbound", "_broken")

    def __init__(self, address: str, outbound: bool):
        self.address = address
        self.outbound = outbound
        self._broken: str | None = None

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        return f"Peer({self.address!r}, {'outbound' if self.outbound else 'inbound'})"


class LogLimit:
    """Log lines that peers can cause, counted per kind: the first ``first`` are logged, then one in
    ``every`` with the count so far, so that a flood of bad connections cannot flood the log."""

    def __init__(self, first: int = LOG_FIRST, every: int = LOG_EVERY):
        self.first, self.every = first, every
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, level: int, kind: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        with self._lock:
            n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n < self.first:
            log.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
        elif n == self.first:
            log.log(level, msg + " (%d such lines; from now on only one in %d is logged)", *args, n, self.every,
                    exc_info=exc_info, stacklevel=2)
        elif n % self.every == 0:
            log.log(level, msg + " (%d such lines so far)", *args, n, exc_info=exc_info, stacklevel=2)


class Connection:
    """One socket with its receive state; its sends are serialized by ``send_lock``."""

    # set by transport 'shm' on an accepted connection only (read with getattr and a default)
    hello_seen: bool
    pending_tx: Any  # kvframe_transports.shm.Ring | None, its ring until the peer confirms

    def __init__(self, transport: TcpTransport, sock: socket.socket, peer: Peer):
        self.transport = transport
        self.sock = sock
        self.peer = peer
        self.send_lock = threading.Lock()
        self.broken: str | None = None
        self.closed = False
        # the socket is closed only once it is broken, out of the receiver thread's selector (else
        # a new socket reusing its number would clash there) and no send is on it (else that send
        # could write into the new socket): whoever ends the last of these closes it
        self.watched = False
        self.sending = False
        self.registered = False  # in the receiver thread's selector (the receiver thread's own)
        self.disconnected = False  # by disconnect(): nothing more of it reaches recv
        # an accepted connection's first data message is bounded, and nothing after it is read until
        # the application has taken it (the peer is not trusted yet)
        self.first_pending = not peer.outbound
        self.held = False
        self.handshake: Any = None  # transport 'shm': the same-host proof under way (outbound)
        self.tx_ring: Any = None  # shared-memory rings, set up by transport 'shm'
        self.rx_ring: Any = None
        self.prefix = bytearray(PREFIX.size)
        self.marker = bytearray(MARKER.size)
        self._expect_prefix()

    # receive state machine: ``want`` is the memory the next stream bytes go to; ``on_filled`` runs
    # when it is full and sets the next ``want``
    def _expect_prefix(self) -> None:
        self.want = memoryview(self.prefix)
        self.on_filled = self._got_prefix

    def drop_rx(self) -> None:
        """Forget a message half received: its buffer goes now, not whenever the handle does."""
        for name in ("lengths_buf", "body", "frames", "flags", "shm_left"):
            self.__dict__.pop(name, None)
        self._expect_prefix()

    def _got_prefix(self) -> None:
        magic, version, kind, reserved, n = PREFIX.unpack(self.prefix)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r} (not a kvframe tcp peer?)")
        if version != VERSION or kind not in (DATA, CONTROL) or reserved:
            raise ProtocolError(f"unknown wire version {version}, message kind {kind} or reserved field {reserved}")
        limit = self.transport.config.max_frames if kind == DATA else MAX_CONTROL_FRAMES
        if not 1 <= n <= limit:
            raise ProtocolError(f"a {'message' if kind == DATA else 'control message'} of {n} frames "
                                f"(allowed: 1 to {limit})")
        first = self.transport.config.max_first_message_bytes
        if kind == DATA and self.first_pending and 8 * n > first:  # its lengths alone would not fit
            raise ProtocolError(f"a first message of {n} frames: its lengths table is over the limit of {first} "
                                "bytes for a connection's first message (max_first_message_bytes)")
        self.kind, self.nframes = kind, n
        self.lengths_buf = bytearray(8 * n)  # at most 8 MiB, bounded by max_frames
        self.want = memoryview(self.lengths_buf)
        self.on_filled = self._got_lengths

    def _got_lengths(self) -> None:
        raw = struct.unpack(f"<{self.nframes}Q", self.lengths_buf)
        del self.lengths_buf
        flags = [x >= SHM_FLAG for x in raw]
        lengths = [x & (SHM_FLAG - 1) for x in raw]
        total = sum(lengths)
        config = self.transport.config
        if self.kind == CONTROL:
            what, limit = "control message", MAX_CONTROL_BYTES
        elif self.first_pending:
            what, limit = "first message", min(config.max_first_message_bytes, config.max_message_bytes)
        else:
            what, limit = "message", config.max_message_bytes
        if total > limit:
            raise ProtocolError(f"a {what} of {total} bytes is over the limit of {limit} bytes")
        if any(flags) and (self.kind != DATA or self.rx_ring is None):
            raise ProtocolError("a shared-memory frame on a connection without shared memory")
        self.body = np.empty(total, dtype=np.uint8)
        body = self.body.data  # memoryview(self.body), which numpy types as a buffer only on Python 3.12+
        self.frames: list[memoryview] = []
        off = 0
        for n in lengths:
            self.frames.append(body[off:off + n])
            off += n
        self.flags = flags
        self.total = total
        self.index = -1
        self._next_frame()

    def _next_frame(self) -> None:
        while True:
            self.index += 1
            if self.index == self.nframes:
                frames, kind = self.frames, self.kind
                del self.frames, self.body, self.flags
                self._expect_prefix()
                self.transport._deliver(self, kind, frames, self.total)
                return
            frame = self.frames[self.index]
            if not frame.nbytes:
                continue
            if self.flags[self.index]:
                self.shm_left = frame  # filled chunk by chunk, one descriptor each
                self.want = memoryview(self.marker)
                self.on_filled = self._got_marker
            else:
                self.want = frame
                self.on_filled = self._next_frame
            return

    def _got_marker(self) -> None:
        pos, n = MARKER.unpack(self.marker)
        if not 0 < n <= self.shm_left.nbytes:
            raise ProtocolError(f"a shared-memory chunk of {n} bytes where {self.shm_left.nbytes} are left")
        self.rx_ring.read(pos, self.shm_left[:n])
        self.shm_left = self.shm_left[n:]
        if self.shm_left.nbytes:
            self.want = memoryview(self.marker)
        else:
            del self.shm_left
            self._next_frame()

    def _advance(self, n: int) -> None:
        self.want = self.want[n:]
        if not self.want.nbytes:
            self.on_filled()

    def on_readable(self) -> bool:
        """Read what the socket has (a bounded amount); False once the peer has closed."""
        t = self.transport
        recv_into, staging, staging_mv = self.sock.recv_into, t._staging, t._staging_mv
        for _ in range(READS_PER_WAKE):
            if not t._may_read(self):  # held, disconnected, or recv() is behind: stop at once
                return True
            if self.want.nbytes >= DIRECT_BYTES:
                try:
                    n = recv_into(self.want)
                except (BlockingIOError, InterruptedError):
                    return True
                if not n:
                    return False
                self._advance(n)
                continue
            # until its first message is through, an accepted connection is read no further than
            # what is due, so that nothing after that message is buffered or allocated
            size = min(self.want.nbytes, STAGING_BYTES) if self.first_pending else STAGING_BYTES
            try:
                n = recv_into(staging, size)
            except (BlockingIOError, InterruptedError):
                return True
            if not n:
                return False
            pos = 0
            while pos < n:  # every byte read goes where the state machine wants it
                k = min(self.want.nbytes, n - pos)
                self.want[:k] = staging_mv[pos:pos + k]
                pos += k
                self._advance(k)
            if n < size:
                return True  # the socket is drained
        return True


class TcpTransport:
    """A ``tcp`` endpoint (see the module docstring). Extra public API: :meth:`broken`,
    :meth:`disconnect`, :meth:`peers`."""

    scheme = "tcp"
    # honoured as the conformance suite (kvframe.testing.TransportConformance) tests them
    supports_first_message_limit = True
    supports_queue_limit = True
    disconnect_discards_queued = True

    def __init__(self, config: TcpOptions | None = None):
        self.config = config or TcpConfig()
        self._conns: dict[Peer, Connection] = {}
        self._open: set[Connection] = set()  # connections whose socket is not closed yet
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()  # guards the dict, the set, the listeners and the pending list
        self._pending: list[tuple[str, Any]] = []  # work for the receiver thread
        self._closed = False
        # messages waiting for recv: (peer, frames, bytes, the connection if it is its first message)
        self._items: deque[tuple[Peer, list[memoryview], int, Connection | None]] = deque()
        self._queued = 0  # their bytes
        self._full = False  # over max_queued_bytes: nothing is read until recv() took it down to half
        self._qcond = threading.Condition(threading.Lock())  # guards the three above
        self._log = LogLimit()
        # the receiver thread's own: one staging buffer for every connection (it reads one at a time),
        # the connections it watches, whether it paused them for a full queue, listeners at rest
        self._staging = bytearray(STAGING_BYTES)
        self._staging_mv = memoryview(self._staging)
        self._rx_conns: set[Connection] = set()
        self._rx_paused = False
        self._resting: list[tuple[float, socket.socket]] = []
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="kvframe-tcp-receiver", daemon=True)
        self._thread.start()

    # public API --------------------------------------------------------------------------------
    def listen(self, host: str, port: int = 0) -> str:
        self._check_open()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(512)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {format_address(host, port)}: {exc}") from exc
        with self._lock:
            self._listeners.append(sock)
        self._watch("listener", sock)
        return format_address(host, sock.getsockname()[1])

    def address(self, host: str, port: int) -> str:
        return format_address(host, port)

    def connect(self, address: str) -> Peer:
        host, port = parse_address(address)
        self._check_open()
        deadline = time.monotonic() + self.config.connect_timeout
        sock = self._dial(address, host, port, deadline)
        conn = self._add(sock, Peer(address, outbound=True))
        self._connected(conn, deadline)
        return conn.peer

    def send(self, peer: Hashable, frames: Sequence[Frame]) -> None:
        views = [byte_view(f, i) for i, f in enumerate(frames)]
        if not views:
            raise ValueError("a message needs at least one frame")
        self._send(self._conn(peer), DATA, views)

    def recv(self, timeout: float | None) -> tuple[Peer, Frames] | None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._qcond:
            while not self._items:
                left = None if deadline is None else deadline - time.monotonic()
                if self._closed or (left is not None and left <= 0):
                    return None
                self._qcond.wait(left)
            peer, frames, nbytes, first = self._items.popleft()
            self._queued -= nbytes
            wake = self._room_made()
        if first is not None:  # the caller has it now (and may disconnect the peer): read on
            self._watch("resume", first)
        elif wake:
            self._wake()
        return peer, frames

    def broken(self, peer: Hashable) -> str | None:
        """Why the connection to ``peer`` broke, or None while it works (or for an unknown handle).
        ``recv`` never raises for a broken peer; a caller that waits for a reply asks this."""
        return peer._broken if isinstance(peer, Peer) else None

    def disconnect(self, peer: Hashable) -> None:
        """Drop ``peer`` (one that failed authentication) now: nothing more is read from it, its
        connection is closed and its memory released, its messages still waiting for ``recv`` are
        discarded, and sends to it raise TransportError. Idempotent."""
        conn = self._conns.get(peer)  # type: ignore[call-overload]  # any handle: a stranger gives None
        if conn is not None:
            conn.disconnected = True  # before it is marked broken: _deliver checks in that order
            self._fail(conn, "disconnected by this endpoint")
        elif self.broken(peer) is None:
            raise TransportError(f"unknown peer {peer!r}: not a handle from this endpoint's connect or recv")
        wake = False
        with self._qcond:
            if any(item[0] is peer for item in self._items):
                self._items = deque(item for item in self._items if item[0] is not peer)
                self._queued = sum(item[2] for item in self._items)
                wake = self._room_made()
        if wake:
            self._wake()

    def peers(self) -> list[Peer]:
        """The handles of every connection that works now."""
        with self._lock:
            return [p for p, c in self._conns.items() if c.broken is None]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listeners = list(self._listeners)
        self._wake()
        self._thread.join(timeout=2.0)
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            conn.watched = False  # the receiver thread is gone
            self._shut(conn, "the endpoint closed")
        for sock in listeners:
            sock.close()
        self._wake_w.close()
        if not self._thread.is_alive():
            self._sel.close()
            self._wake_r.close()
            self._rx_conns.clear()
            with self._lock:
                self._pending.clear()
        with self._qcond:  # what nobody received goes now; a blocked recv returns None
            self._items.clear()
            self._queued = 0
            self._qcond.notify_all()
        self._closed_hook()

    def __enter__(self) -> TcpTransport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # hooks for transport 'shm' --------------------------------------------------------------------
    def _connected(self, conn: Connection, deadline: float) -> None:
        """An outbound connection is up (the caller's thread)."""

    def _on_control(self, conn: Connection, frames: list[memoryview]) -> None:
        """A control message came (the receiver thread). This endpoint does no shared memory."""
        if bytes(frames[0]) == b"hello":
            self._send_control_now(conn, [b"refuse", b"this endpoint is plain tcp"])

    def _uses_shm(self, conn: Connection, nbytes: int) -> bool:
        return False

    def _send_shm(self, conn: Connection, frame: memoryview) -> None:
        raise AssertionError("unreachable: no shared memory")

    def _dropped(self, conn: Connection) -> None:
        """A connection broke or closed (any thread, once)."""

    def _closed_hook(self) -> None:
        """The endpoint closed."""

    # sending -----------------------------------------------------------------------------------
    def _conn(self, peer: Hashable) -> Connection:
        conn = self._conns.get(peer)  # type: ignore[call-overload]  # any handle: a stranger gives None
        if conn is None or conn.broken is not None:
            reason = self.broken(peer) if conn is None else conn.broken
            if self._closed:
                reason = "this endpoint is closed"
            if reason is None:
                raise TransportError(f"unknown peer {peer!r}: not a handle from this endpoint's connect or recv")
            raise TransportError(f"cannot send to {peer}: {reason}")
        return conn

    def _send(self, conn: Connection, kind: int, views: list[memoryview]) -> None:
        shm = [kind == DATA and v.nbytes > 0 and self._uses_shm(conn, v.nbytes) for v in views]
        head = PREFIX.pack(MAGIC, VERSION, kind, 0, len(views)) + struct.pack(
            f"<{len(views)}Q", *(v.nbytes | SHM_FLAG if s else v.nbytes for v, s in zip(views, shm)))
        with conn.send_lock:
            with self._lock:
                if conn.broken is not None:
                    raise TransportError(f"cannot send to {conn.peer}: {conn.broken}")
                conn.sending = True
            try:
                batch: list[memoryview] = [memoryview(head)]
                for v, s in zip(views, shm):
                    if s:  # the stream so far goes first: the receiver reads in order
                        self._write(conn, batch)
                        batch = []
                        self._send_shm(conn, v)
                    elif v.nbytes:
                        batch.append(v)
                self._write(conn, batch)
            except TransportError as exc:
                self._fail(conn, str(exc))
                raise
            except OSError as exc:
                reason = f"the connection broke ({exc.strerror or exc})"
                self._fail(conn, reason)
                raise TransportError(f"cannot send to {conn.peer}: {reason}") from exc
            except BaseException:  # half a message went out: the stream cannot carry another
                self._fail(conn, "a send was interrupted in the middle of a message")
                raise
            finally:
                with self._lock:
                    conn.sending = False
                self._release_socket(conn)

    def _write(self, conn: Connection, bufs: list[memoryview]) -> None:
        """All of ``bufs`` into the socket (called with the send lock held)."""
        sock, i, timeout = conn.sock, 0, self.config.send_timeout
        stalled_since = None
        while i < len(bufs):
            try:
                sent = sock.sendmsg(bufs[i:i + IOV_MAX])
            except (BlockingIOError, InterruptedError):
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > timeout:
                    raise TransportError(f"cannot send to {conn.peer}: no progress for {timeout} s "
                                         "(the peer stopped reading)") from None
                self._wait_writable(conn)
                continue
            stalled_since = None
            while sent:
                n = bufs[i].nbytes
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    bufs[i] = bufs[i][sent:]
                    sent = 0

    def _wait_writable(self, conn: Connection) -> None:
        if self._closed or conn.broken is not None:
            raise TransportError(f"cannot send to {conn.peer}: {conn.broken or 'this endpoint is closed'}")
        p = select.poll()
        p.register(conn.sock, select.POLLOUT)
        p.poll(100)  # wakes now and then to notice close() and a broken connection

    def _send_control_now(self, conn: Connection, frames: list[bytes]) -> None:
        """A small control message from the receiver thread, which must never wait: not for a send
        lock a caller holds while the peer reads slowly (two endpoints could deadlock), nor for a
        peer that does not read (every other peer would starve).  One try, else no message."""
        if not conn.send_lock.acquire(blocking=False):
            log.debug("control message to %s skipped: a send is in progress", conn.peer)
            return
        try:
            if conn.broken is not None:
                return
            msg = PREFIX.pack(MAGIC, VERSION, CONTROL, 0, len(frames)) + struct.pack(
                f"<{len(frames)}Q", *map(len, frames)) + b"".join(frames)
            try:
                sent = conn.sock.send(msg)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(conn, f"the connection broke ({exc.strerror or exc})")
                return
            if sent == 0:
                log.debug("control message to %s skipped: its socket is full", conn.peer)
            elif sent < len(msg):  # half a message went out: the stream cannot carry another
                self._fail(conn, "dropped: it does not read what is sent to it")
        finally:
            conn.send_lock.release()  # a failed connection is closed by _pump, which runs next

    # connections -------------------------------------------------------------------------------
    def _dial(self, address: str, host: str, port: int, deadline: float) -> socket.socket:
        """Connect, retrying until ``deadline``: servers may start a little after their workers."""
        delay, last = 0.01, "no attempt"
        while True:
            self._check_open()
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                for family, socktype, proto, _, sockaddr in infos:
                    sock = socket.socket(family, socktype, proto)
                    try:
                        sock.settimeout(max(0.05, deadline - time.monotonic()))
                        sock.connect(sockaddr)
                        return sock
                    except OSError as exc:
                        sock.close()
                        last = exc.strerror or str(exc)
            except socket.gaierror as exc:
                last = f"cannot resolve {host!r}: {exc.strerror}"
            if time.monotonic() + delay > deadline:
                raise TransportError(f"cannot connect to {address} within connect_timeout="
                                     f"{self.config.connect_timeout} s: {last}")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _setup(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        if self.config.keepalive:
            opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        if self.config.thin_linear_timeouts and TCP_THIN_LINEAR_TIMEOUTS is not None:
            opts.append((socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1))
        if self.config.rto_min_ms and TCP_RTO_MIN_US is not None:
            opts.append((socket.IPPROTO_TCP, TCP_RTO_MIN_US, int(self.config.rto_min_ms * 1000)))
        if self.config.socket_buffer_bytes:
            opts += [(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.socket_buffer_bytes),
                     (socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.socket_buffer_bytes)]
        for level, opt, value in opts:
            try:
                sock.setsockopt(level, opt, value)
            except OSError:  # an option this kernel lacks is only an optimization
                pass

    def _add(self, sock: socket.socket, peer: Peer) -> Connection:
        self._setup(sock)
        conn = Connection(self, sock, peer)
        with self._lock:
            if self._closed:
                sock.close()
                raise TransportError("this endpoint is closed")
            self._conns[peer] = conn
            self._open.add(conn)
            conn.watched = True  # from now until the receiver thread lets go of it
        if threading.current_thread() is self._thread:
            self._rx_conns.add(conn)
            self._refresh(conn)
        else:
            self._watch("conn", conn)
        return conn

    def _fail(self, conn: Connection, reason: str) -> None:
        """Mark a connection broken. Its socket is shut down at once (a sender blocked on it wakes
        up) and closed by whoever holds or next takes its send lock, never under a running send."""
        with self._lock:
            if conn.broken is not None:
                return
            conn.broken = reason
            conn.peer._broken = reason
            self._conns.pop(conn.peer, None)
        log.debug("connection to %s ended: %s", conn.peer, reason)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._dropped(conn)
        if threading.current_thread() is not self._thread:
            self._watch("refresh", conn)  # it may be out of the selector (paused): let go of it now

    def _shut(self, conn: Connection, reason: str) -> None:
        self._fail(conn, reason)
        self._release_socket(conn)

    def _release_socket(self, conn: Connection) -> None:
        """Close the socket of a broken connection once nothing uses it (see Connection.watched)."""
        with self._lock:
            if conn.closed or conn.broken is None or conn.watched or conn.sending:
                return
            conn.closed = True
            self._open.discard(conn)
        conn.sock.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("this endpoint is closed")

    # the receive queue -------------------------------------------------------------------------
    def _deliver(self, conn: Connection, kind: int, frames: list[memoryview], nbytes: int) -> None:
        """A whole message came (the receiver thread)."""
        if kind != DATA:
            self._on_control(conn, frames)
            return
        first = None
        if conn.first_pending:
            conn.first_pending = False
            conn.held = True  # read on once recv() has handed this out
            first = conn
        with self._qcond:
            if conn.disconnected:  # disconnect() came while this was read
                return
            self._items.append((conn.peer, frames, nbytes, first))
            self._queued += nbytes
            if self._queued > self.config.max_queued_bytes:
                self._full = True  # _may_read says no from now on
            self._qcond.notify()

    def _room_made(self) -> bool:
        """Whether the queue just dropped to half its bound after it filled (``_qcond`` held)."""
        if self._full and self._queued <= self.config.max_queued_bytes // 2:
            self._full = False
            return True
        return False

    # the receiver thread -------------------------------------------------------------------------
    def _watch(self, what: str, obj: Any) -> None:
        with self._lock:
            self._pending.append((what, obj))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _may_read(self, conn: Connection) -> bool:
        # while the queue is full, a connection still proving the same host is read (only control
        # messages come then), so that its connect() need not time out
        return conn.broken is None and not conn.held and (not self._full or conn.handshake is not None)

    def _refresh(self, conn: Connection) -> None:
        """Watch ``conn``'s socket exactly while it may be read; let go of it once it is broken."""
        if conn not in self._rx_conns:
            return
        if conn.broken is not None:
            if conn.registered:
                self._sel.unregister(conn.sock)
                conn.registered = False
            self._rx_conns.discard(conn)
            conn.drop_rx()
            conn.watched = False
            self._release_socket(conn)
            return
        want = self._may_read(conn)
        if not want and self._full:
            self._rx_paused = True  # so that _run registers it again once recv() made room
        if want != conn.registered:
            if want:
                self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            else:
                self._sel.unregister(conn.sock)
            conn.registered = want

    def _run(self) -> None:
        sel = self._sel
        while not self._closed:
            timeout = max(0.0, self._resting[0][0] - time.monotonic()) if self._resting else None
            try:
                events = sel.select(timeout)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                log.error("tcp receiver thread stops: %s", exc)
                return
            for key, _ in events:
                obj = key.data
                if obj is None:
                    self._drain_wake()
                elif isinstance(obj, Connection):
                    if obj.registered:  # not let go of earlier in this round
                        self._pump(obj)
                else:
                    self._accept(key.fileobj)  # type: ignore[arg-type]  # registered as a listening socket
            full = self._full
            if full != self._rx_paused:  # the queue filled up, or recv() made room: (un)pause them all
                self._rx_paused = full
                for conn in list(self._rx_conns):
                    self._refresh(conn)
            if self._resting and self._resting[0][0] <= time.monotonic():
                _, sock = self._resting.pop(0)
                if not self._closed:
                    sel.register(sock, selectors.EVENT_READ, "listener")

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            pending, self._pending = self._pending, []
        for what, obj in pending:
            if what == "listener":
                self._sel.register(obj, selectors.EVENT_READ, "listener")
                continue
            if what == "conn":
                self._rx_conns.add(obj)
            elif what == "resume":
                obj.held = False
            self._refresh(obj)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: rest, rather than spin on it
                self._log(logging.WARNING, "accept", "accepting a connection failed: %s", exc)
                self._sel.unregister(listener)
                self._resting.append((time.monotonic() + ACCEPT_REST, listener))
                return
            try:
                self._add(sock, Peer(format_address(addr[0], addr[1]), outbound=False))
            except TransportError:
                return

    def _pump(self, conn: Connection) -> None:
        reason = None
        try:
            if not conn.on_readable():
                reason = "closed by the peer"
        except ProtocolError as exc:
            reason = f"dropped: {exc}"
            self._log(logging.WARNING, "drop", "dropping the connection with %s: %s", conn.peer, exc)
        except OSError as exc:
            reason = f"the connection broke ({exc.strerror or exc})"
        except MemoryError:
            reason = "dropped: out of memory for its message"
            self._log(logging.WARNING, "drop", "dropping the connection with %s: no memory for its message",
                      conn.peer)
        except Exception as exc:  # a bug must not stop the thread that serves every other peer
            reason = f"dropped: {type(exc).__name__}: {exc}"
            self._log(logging.ERROR, "bug", "dropping the connection with %s", conn.peer, exc_info=True)
        if reason is not None:
            self._fail(conn, reason)
        self._refresh(conn)  # out of the selector if it broke, is held or must wait for recv()


def make_transport(config: TcpOptions) -> TcpTransport:
    return TcpTransport(config)


@hookimpl
def kvframe_register_transports(register):
    register("tcp", make_transport, TcpConfig)
