"""Transport 'plainpipe': length-prefixed frames on plain TCP sockets, one reader thread per
connection.  What a third party writes to add a transport: small and slow-ish, but real (it runs
between processes) and it passes kvframe's transport conformance suite.

A message on the wire: b"PLPP", the number of frames n (u32), n frame lengths (u64), the frames.
The reader checks the lengths against ``max_message_bytes`` before it allocates the message, and
drops the connection of a peer that breaks the format or the limit.
"""

import queue
import re
import socket
import struct
import threading
import time
from typing import Literal

import kvframe
from kvframe.config import TransportConfig
from kvframe.errors import TransportError

MAGIC = b"PLPP"
HEAD = struct.Struct("<4sI")
MAX_FRAMES = 1 << 16
ADDRESS = re.compile(r"^plainpipe://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d{1,5})$")


class PlainPipeConfig(TransportConfig):
    type: Literal["plainpipe"] = "plainpipe"


def _address(host, port):
    return f"plainpipe://[{host}]:{port}" if ":" in host else f"plainpipe://{host}:{port}"


class Conn:
    """One connection; the object itself is the peer handle (hashable by identity)."""

    def __init__(self, sock, address):
        self.sock = sock
        self.address = address
        self.broken = None
        self.reader = None

    def __str__(self):
        return self.address

    def __repr__(self):
        return f"<plainpipe peer {self.address}>"


class PlainPipe:
    def __init__(self, config):
        self.config = config
        self._inbox = queue.Queue()
        self._lock = threading.Lock()
        self._conns = []
        self._listeners = []
        self._threads = []
        self._closed = False

    def listen(self, host, port=0):
        self._check_open()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {_address(host, port)}: {exc}") from exc
        sock.settimeout(0.2)  # the accept loop looks at close() this often
        self._start(self._accept_loop, sock)
        with self._lock:
            self._listeners.append(sock)
        return _address(host, sock.getsockname()[1])

    def address(self, host, port):
        return _address(host, port)

    def connect(self, address):
        m = ADDRESS.match(address) if isinstance(address, str) else None
        if m is None:
            raise TransportError(f"cannot use address {address!r}: expected plainpipe://HOST:PORT")
        host, port = m["v6"] or m["host"], int(m["port"])
        deadline = time.monotonic() + self.config.connect_timeout
        while True:  # the listener may come up a little later
            self._check_open()
            try:
                sock = socket.create_connection((host, port), timeout=max(0.05, deadline - time.monotonic()))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TransportError(f"cannot connect to {address}: {exc}") from exc
                time.sleep(0.05)
        return self._add(sock, address)

    def send(self, peer, frames):
        views = [memoryview(f).cast("B") for f in frames]
        if not views:
            raise ValueError("a message needs at least one frame")
        if not isinstance(peer, Conn) or peer not in self._conns:
            raise TransportError(f"unknown peer {peer!r}")
        if peer.broken is not None:
            raise TransportError(f"cannot send to {peer}: {peer.broken}")
        head = HEAD.pack(MAGIC, len(views)) + struct.pack(f"<{len(views)}Q", *(v.nbytes for v in views))
        try:
            peer.sock.sendall(head)
            for v in views:
                peer.sock.sendall(v)  # returns once the kernel has the bytes: the buffer is free
        except OSError as exc:
            self._fail(peer, f"the connection broke ({exc})")
            raise TransportError(f"cannot send to {peer}: {peer.broken}") from exc

    def recv(self, timeout):
        if self._closed:
            return None
        try:
            item = self._inbox.get(timeout=None if timeout is None else max(timeout, 0.0))
        except queue.Empty:
            return None
        if item is None:  # close() woke us; leave the wake-up for the next caller
            self._inbox.put(None)
        return item

    def broken(self, peer):
        return getattr(peer, "broken", None) if peer in self._conns else None

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for conn in list(self._conns):
            self._fail(conn, "the endpoint closed")  # wakes its reader
        for t in self._threads:
            t.join(2.0)
        for sock in [*self._listeners, *(c.sock for c in self._conns)]:
            sock.close()
        self._inbox.put(None)

    # internals -----------------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise TransportError("this endpoint is closed")

    def _start(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True, name="plainpipe")
        self._threads.append(t)
        t.start()

    def _add(self, sock, address):
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, address)
        with self._lock:
            if self._closed:
                sock.close()
                raise TransportError("this endpoint is closed")
            self._conns.append(conn)
            self._start(self._read_loop, conn)
        return conn

    def _fail(self, conn, reason):
        if conn.broken is None:
            conn.broken = reason
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept_loop(self, listener):
        while not self._closed:
            try:
                sock, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._add(sock, _address(addr[0], addr[1]))
            except TransportError:
                return

    def _read_loop(self, conn):
        try:
            reason = self._read_messages(conn)
        except OSError as exc:
            reason = f"the connection broke ({exc})"
        self._fail(conn, reason)

    def _read_messages(self, conn):
        limit = self.config.max_message_bytes
        head = bytearray(HEAD.size)
        while True:
            if not self._read_into(conn.sock, memoryview(head)):
                return "closed by the peer"
            magic, n = HEAD.unpack(head)
            if magic != MAGIC or not 1 <= n <= MAX_FRAMES:
                return "dropped: not a plainpipe peer"
            lengths = bytearray(8 * n)
            if not self._read_into(conn.sock, memoryview(lengths)):
                return "closed by the peer in the middle of a message"
            sizes = struct.unpack(f"<{n}Q", lengths)
            total = sum(sizes)
            if total > limit:  # refused before a byte of it is buffered
                return f"dropped: a message of {total} bytes is over the limit of {limit} bytes"
            body = memoryview(bytearray(total))
            if not self._read_into(conn.sock, body):
                return "closed by the peer in the middle of a message"
            frames, off = [], 0
            for size in sizes:
                frames.append(body[off:off + size])
                off += size
            self._inbox.put((conn, frames))

    @staticmethod
    def _read_into(sock, view):
        """Fill ``view`` from the socket; False at end of stream."""
        while view.nbytes:
            n = sock.recv_into(view)
            if n == 0:
                return False
            view = view[n:]
        return True


@kvframe.hookimpl
def kvframe_register_transports(register):
    register("plainpipe", PlainPipe, PlainPipeConfig)
