"""Transport ``shm``: transport ``tcp`` plus shared memory for large frames between processes that
have proven they share a host.

The proof (on every connect): the connecting side creates a ring file in its shared-memory
directory (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600, a random name ``kvframe-<32 hex>``) whose header
holds a random 32-byte token, and sends the name, the token and the ring's size in a ``hello``
control message over the tcp connection.  The listener opens that name in *its own* directory
(``O_NOFOLLOW``; a regular file, owned by its uid, one link, no group or other permissions, the exact
size), maps it and compares the token.  It then writes a random ``echo`` into the mapped header,
creates its own ring and answers ``accept`` with the echo and its ring's name and token.  The
connecting side checks that the echo shows in *its* mapping (so the two really share memory, not
just a file system), maps the listener's ring the same way, writes its own echo there and answers
``confirm``; the listener checks that echo too.  Anything missing or different (another host,
another directory, another user, a plain ``tcp`` listener, no answer within ``handshake_timeout``)
and the connection stays plain tcp.  Each side unlinks the other's file as soon as it has mapped
it, so after the handshake nothing of the job is left in the directory, even if a process is killed.

Data path, per connection and direction: the sender copies a frame of at least ``min_bytes`` into its
ring in chunks of a quarter of the ring, sending one 16-byte descriptor (position, length) per
chunk on the tcp stream, in the place of the frame's bytes.  The receiver's thread copies each chunk
into the message's buffer and advances the ring's tail (in the ring's header); a sender finding the
ring full waits for the tail (up to ``send_timeout`` without progress).  Chunking bounds the ring's
memory and lets the two copies overlap; a frame of any size fits through a ring of any size.
"""

from __future__ import annotations

import hmac
import logging
import mmap
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
from typing import Literal

import numpy as np
from pydantic import Field

from kvframe import hookimpl
from kvframe.errors import TransportError
from kvframe_transports import tcp
from kvframe_transports.addresses import parse_address
from kvframe_transports.tcp import CONTROL, Connection, Peer, ProtocolError, TcpOptions, TcpTransport

log = logging.getLogger("kvframe_transports")

HEADER = 4096  # the ring's header page; its data follow
RING_MAGIC = b"KVFRING1"
RING_HEADER = struct.Struct("<8sQQ32s32s")  # magic, capacity, tail, token, echo
TAIL_WORD = 2  # the tail as the third u64 of the header
TOKEN_AT, ECHO_AT = 24, 56
NAME = re.compile(r"kvframe-[0-9a-f]{32}")
MIN_RING, MAX_RING = 1 << 16, 1 << 32
SIZE = struct.Struct("<Q")


def default_directory() -> str:
    return os.environ.get("KVFRAME_SHM_DIR") or "/dev/shm"


class ShmConfig(TcpOptions):
    type: Literal["shm"] = "shm"
    directory: str | None = Field(
        None, description="where ring files are made (a local tmpfs); None: $KVFRAME_SHM_DIR, else /dev/shm")
    min_bytes: int = Field(256 << 10, ge=1, description="frames of at least this size travel in shared memory")
    ring_bytes: int = Field(16 << 20, ge=MIN_RING, le=1 << 30,
                            description="size of each connection's ring, per direction")
    handshake_timeout: float = Field(5.0, gt=0, description="seconds connect waits for the same-host proof")


class Refused(Exception):
    """The peer's ring cannot be used: the peers do not (provably) share memory."""


class Ring:
    """One direction's ring file, mapped. The sender owns ``head``, the receiver ``tail``."""

    def __init__(self, mm: mmap.mmap, capacity: int, name: str, path: str | None):
        self.mm = mm
        self.capacity = capacity
        self.chunk = capacity // 4
        self.name = name
        self.path = path  # the file this side created and has not yet seen unlinked
        self.header = np.frombuffer(mm, dtype=np.uint8, count=HEADER)
        self.words = np.frombuffer(mm, dtype="<u8", count=HEADER // 8)
        self.data: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8, count=capacity, offset=HEADER)
        self.head = 0  # sender: where the next chunk goes (a count of bytes ever written)
        self.tail = 0  # receiver: where the next chunk comes from

    @classmethod
    def create(cls, directory: str, capacity: int, name: str | None = None) -> tuple[Ring, bytes]:
        """A new ring file holding a fresh token; never follows or reuses an existing name (a name is
        given only by tests)."""
        name = name or f"kvframe-{secrets.token_hex(16)}"
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = HEADER + capacity
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)  # a full tmpfs fails here, not with SIGBUS on a write later
            else:
                os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        token = secrets.token_bytes(32)
        RING_HEADER.pack_into(mm, 0, RING_MAGIC, capacity, 0, token, bytes(32))
        return cls(mm, capacity, name, path), token

    @classmethod
    def open(cls, directory: str, name: str, capacity: int, token: bytes) -> Ring:
        """Map the peer's ring by name in this side's own directory, after every check; then unlink it."""
        if not NAME.fullmatch(name):
            raise Refused(f"bad ring name {name!r}")
        if not MIN_RING <= capacity <= MAX_RING or len(token) != 32:
            raise Refused(f"bad ring size {capacity} or token")
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise Refused(f"cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1 \
                    or st.st_mode & 0o077 or st.st_size != HEADER + capacity:
                raise Refused(f"{path} is not a private regular file of this user of {HEADER + capacity} bytes")
            mm = mmap.mmap(fd, HEADER + capacity)
        finally:
            os.close(fd)
        magic, cap, _, got, _ = RING_HEADER.unpack_from(mm, 0)
        if magic != RING_MAGIC or cap != capacity or not hmac.compare_digest(got, token):
            mm.close()
            raise Refused(f"{path} does not hold the token the peer sent (another host?)")
        ring = cls(mm, capacity, name, None)
        try:  # the same file still at that name: unlink it, now that both sides have it mapped
            if os.stat(path, follow_symlinks=False).st_ino == st.st_ino:
                _unlink(path)
        except OSError:
            pass
        return ring

    def echo(self) -> bytes:
        return self.header[ECHO_AT:ECHO_AT + 32].tobytes()

    def set_echo(self, value: bytes) -> None:
        self.header[ECHO_AT:ECHO_AT + 32] = np.frombuffer(value, dtype=np.uint8)

    def unlink(self) -> None:
        if self.path is not None:
            _unlink(self.path)
            self.path = None

    def read(self, pos: int, dest: memoryview) -> None:
        """The receiver: copy the chunk at ``pos`` out and free its room (the receiver thread)."""
        data, words, n, cap = self.data, self.words, dest.nbytes, self.capacity
        if data is None:
            raise ProtocolError("shared memory is closed")
        expect = self.tail
        if expect % cap + n > cap:  # the sender skips the ring's end when a chunk does not fit there
            expect += cap - expect % cap
        if pos != expect or n > cap:
            raise ProtocolError(f"a shared-memory chunk at {pos} of {n} bytes where one at {expect} was due")
        at = pos % cap
        np.copyto(np.frombuffer(dest, dtype=np.uint8), data[at:at + n])
        self.tail = pos + n
        words[TAIL_WORD] = self.tail

    def close(self) -> None:
        self.unlink()
        self.data = None
        self.header = self.words = None  # type: ignore[assignment]  # closed: the mapping goes
        try:
            self.mm.close()
        except BufferError:  # a copy in progress still holds a view: the mapping goes with it
            pass


def _local_address(address: str) -> bool:
    """Whether ``address`` is one of this host's own (only then can the peer share its memory). A
    socket binds only to a local address, so binding answers without sending anything."""
    try:
        host, _ = parse_address(address)
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (OSError, ValueError):
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("cannot unlink %s: %s", path, exc)


class _Handshake:
    def __init__(self, ring: Ring):
        self.ring = ring
        self.done = threading.Event()
        self.reply: list[bytes] | None = None


class ShmTransport(TcpTransport):
    """An ``shm`` endpoint. Extra public API: :meth:`shared_memory_peers`, ``broken`` (from tcp)."""

    config: ShmConfig

    def __init__(self, config: ShmConfig | None = None):
        config = config or ShmConfig()
        directory = config.directory or default_directory()
        self.shm_directory = directory if os.path.isdir(directory) and os.access(directory, os.W_OK) else None
        if self.shm_directory is None:
            log.info("shared memory is off: %s is not a writable directory", directory)
        super().__init__(config)

    def shared_memory_peers(self) -> list[Peer]:
        """The peers that large frames travel to and from through shared memory."""
        with self._lock:
            return [p for p, c in self._conns.items() if c.broken is None and c.tx_ring is not None
                    and c.rx_ring is not None]

    # the handshake, connecting side (the caller's thread) ----------------------------------------
    def _connected(self, conn: Connection, deadline: float) -> None:
        if self.shm_directory is None or not _local_address(conn.peer.address):
            return  # another host cannot share memory: no file is made for it
        try:
            ring, token = Ring.create(self.shm_directory, self.config.ring_bytes)
        except OSError as exc:
            log.info("no shared memory with %s: cannot create a ring in %s: %s", conn.peer, self.shm_directory, exc)
            return
        hs = conn.handshake = _Handshake(ring)
        self._watch("refresh", conn)  # read even while recv() is behind: the answer must come through
        try:
            self._send(conn, CONTROL, [memoryview(b"hello"), memoryview(ring.name.encode()), memoryview(token),
                                       memoryview(SIZE.pack(ring.capacity))])
            hs.done.wait(max(0.0, min(self.config.handshake_timeout, deadline - time.monotonic())))
            reason = self._finish_handshake(conn, hs)
        except TransportError as exc:
            reason = str(exc)
        finally:
            conn.handshake = None
        if reason is not None:
            ring.close()
            log.info("no shared memory with %s: %s", conn.peer, reason)
            if conn.broken is None:
                self._send_refusal(conn, reason)

    def _finish_handshake(self, conn: Connection, hs: _Handshake) -> str | None:
        """Check the listener's answer; None once both rings are in use, else why not."""
        reply = hs.reply
        if reply is None:
            return "the listener did not answer the hello in time"
        if reply[0] != b"accept" or len(reply) != 5:
            return f"the listener refused: {reply[1].decode(errors='replace') if len(reply) > 1 else '?'}"
        _, echo, name, token, size = reply
        if len(size) != SIZE.size or not hmac.compare_digest(hs.ring.echo(), echo):
            return "the listener's write did not show in this side's memory (not the same host)"
        assert self.shm_directory is not None  # _connected made a ring in it
        try:
            rx = Ring.open(self.shm_directory, name.decode(errors="replace"), SIZE.unpack(size)[0], token)
        except Refused as exc:
            return str(exc)
        hs.ring.unlink()  # the listener has mapped it (it echoed), and unlinked it already
        mine = secrets.token_bytes(32)
        rx.set_echo(mine)
        conn.rx_ring = rx  # before confirm: the listener may use its ring right after reading it
        try:
            self._send(conn, CONTROL, [memoryview(b"confirm"), memoryview(mine)])
        except TransportError:
            conn.rx_ring = None
            rx.close()
            raise
        conn.tx_ring = hs.ring
        return None

    def _send_refusal(self, conn: Connection, reason: str) -> None:
        try:
            self._send(conn, CONTROL, [memoryview(b"refuse"), memoryview(reason.encode()[:4000])])
        except TransportError:
            pass

    # the handshake, both sides (the receiver thread) ------------------------------------------------
    def _on_control(self, conn: Connection, frames: list[memoryview]) -> None:
        what = bytes(frames[0])
        if conn.peer.outbound:
            hs = getattr(conn, "handshake", None)
            if what in (b"accept", b"refuse") and hs is not None and hs.reply is None:
                hs.reply = [bytes(f) for f in frames]
                hs.done.set()
            return  # an answer after connect gave up: connect has told the listener 'refuse'
        if what == b"hello":
            self._hello(conn, frames)
        elif what == b"confirm":
            self._confirm(conn, frames)
        elif what == b"refuse" and conn.tx_ring is None:  # after confirm, the rings stay: sends may use them
            self._log(logging.INFO, "shm", "no shared memory with %s: it refused: %s", conn.peer,
                      bytes(frames[-1][:200]).decode(errors="replace"))
            self._release(conn)

    def _hello(self, conn: Connection, frames: list[memoryview]) -> None:
        if getattr(conn, "hello_seen", False):
            raise ProtocolError("a second hello")
        conn.hello_seen = True
        if self.shm_directory is None:
            self._send_control_now(conn, [b"refuse", b"the listener has no shared-memory directory"])
            return
        if len(frames) != 4 or frames[3].nbytes != SIZE.size:
            self._send_control_now(conn, [b"refuse", b"malformed hello"])
            return
        name = bytes(frames[1]).decode(errors="replace")
        try:
            rx = Ring.open(self.shm_directory, name, SIZE.unpack(frames[3])[0], bytes(frames[2]))
        except Refused as exc:
            self._log(logging.INFO, "shm", "no shared memory with %s: %s", conn.peer, exc)
            self._send_control_now(conn, [b"refuse", str(exc).encode()])
            return
        try:
            tx, token = Ring.create(self.shm_directory, self.config.ring_bytes)
        except OSError as exc:
            rx.close()
            self._send_control_now(conn, [b"refuse", f"the listener cannot create a ring: {exc}".encode()])
            return
        echo = secrets.token_bytes(32)
        rx.set_echo(echo)
        conn.rx_ring, conn.pending_tx = rx, tx
        self._send_control_now(conn, [b"accept", echo, tx.name.encode(), token, SIZE.pack(tx.capacity)])

    def _confirm(self, conn: Connection, frames: list[memoryview]) -> None:
        tx = getattr(conn, "pending_tx", None)
        conn.pending_tx = None
        if tx is None:
            return
        tx.unlink()  # the connecting side mapped it and has unlinked it already
        if len(frames) == 2 and hmac.compare_digest(tx.echo(), bytes(frames[1])):
            conn.tx_ring = tx
        else:
            self._log(logging.INFO, "shm", "no shared memory to %s: its write did not show in this side's memory",
                      conn.peer)
            tx.close()

    def _release(self, conn: Connection) -> None:
        for attr in ("tx_ring", "rx_ring", "pending_tx"):
            ring = getattr(conn, attr, None)
            if ring is not None:
                setattr(conn, attr, None)
                ring.close()

    # data path ---------------------------------------------------------------------------------
    def _uses_shm(self, conn: Connection, nbytes: int) -> bool:
        return conn.tx_ring is not None and nbytes >= self.config.min_bytes

    def _send_shm(self, conn: Connection, frame: memoryview) -> None:
        ring = conn.tx_ring
        data = ring.data if ring is not None else None  # held: the mapping stays while we copy
        if data is None:
            raise TransportError(f"cannot send to {conn.peer}: its shared memory is closed")
        words, cap, chunk = ring.words, ring.capacity, ring.chunk
        src = np.frombuffer(frame, dtype=np.uint8)
        off, n = 0, src.nbytes
        while off < n:
            k = min(chunk, n - off)
            pos = ring.head
            if pos % cap + k > cap:  # no chunk wraps around the ring's end
                pos += cap - pos % cap
            if int(words[TAIL_WORD]) < pos + k - cap:
                self._wait_room(conn, words, pos + k - cap)
            at = pos % cap
            np.copyto(data[at:at + k], src[off:off + k])
            ring.head = pos + k
            # the descriptor follows the copy through a syscall, which orders the two for the reader
            self._write(conn, [memoryview(tcp.MARKER.pack(pos, k))])
            off += k

    def _wait_room(self, conn: Connection, words: np.ndarray, need: int) -> None:
        """Until the receiver's tail reaches ``need``; fails after send_timeout without progress."""
        timeout, delay = self.config.send_timeout, 20e-6
        last, since = int(words[TAIL_WORD]), time.monotonic()
        while True:
            tail = int(words[TAIL_WORD])
            if tail >= need:
                return
            if conn.broken is not None or self._closed:
                raise TransportError(f"cannot send to {conn.peer}: {conn.broken or 'this endpoint is closed'}")
            now = time.monotonic()
            if tail != last:
                last, since, delay = tail, now, 20e-6
            elif now - since > timeout:
                raise TransportError(f"cannot send to {conn.peer}: its shared-memory ring stayed full for "
                                     f"{timeout} s (the peer stopped reading)")
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    # cleanup -----------------------------------------------------------------------------------
    def _dropped(self, conn: Connection) -> None:
        hs = getattr(conn, "handshake", None)
        if hs is not None:
            hs.done.set()  # connect stops waiting; it closes its ring
        self._release(conn)


def make_transport(config: ShmConfig) -> ShmTransport:
    return ShmTransport(config)


@hookimpl
def kvframe_register_transports(register):
    register("shm", make_transport, ShmConfig)


__all__ = ["ShmConfig", "ShmTransport", "Ring", "Refused", "default_directory"]
