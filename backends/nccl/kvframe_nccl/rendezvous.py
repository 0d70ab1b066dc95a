"""A tiny TCP rendezvous that hands rank 0's NCCL unique id to every other rank.

Rank 0 listens on the rendezvous address; each other rank connects, says who it is, and receives
the raw 128-byte id. Everything on the wire is fixed-size plain bytes (never pickle), every wait
has a timeout, and each failure names what was waited for.

Wire format (version 1), all integers big-endian:

- hello, rank r -> rank 0: ``b"KVFN"`` | version u8 | rank u32 | world size u32 | token digest (32 bytes)
- reply, rank 0 -> rank r: ``b"KVFN"`` | status u8 (0 ok, 1 error) | then either the 128-byte id,
  or u16 length + UTF-8 message

The token digest is SHA-256 of the job's secret (``KVFRAME_SECRET``), or 32 zero bytes when none
is set; rank 0 refuses a hello whose digest differs. This keeps strangers from joining by accident;
it does not encrypt the id (run on a trusted network).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import socket
import struct
import time

MAGIC = b"KVFN"
VERSION = 1
ID_BYTES = 128
_HELLO = struct.Struct("!4sBII32s")
_REPLY_HEAD = struct.Struct("!4sB")


class RendezvousError(RuntimeError):
    """The unique-id exchange failed; the message says which rank, which address and why."""


class RendezvousTimeout(RendezvousError, TimeoutError):
    pass


def token_digest(token: str | bytes | None) -> bytes:
    if not token:
        return bytes(32)
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def encode_hello(rank: int, world_size: int, token: str | bytes | None = None) -> bytes:
    return _HELLO.pack(MAGIC, VERSION, rank, world_size, token_digest(token))


def decode_hello(data: bytes) -> tuple[int, int, int, bytes]:
    """(version, rank, world_size, digest); raises RendezvousError on a malformed hello."""
    if len(data) != _HELLO.size:
        raise RendezvousError(f"hello has {len(data)} bytes, expected {_HELLO.size}")
    magic, version, rank, world, digest = _HELLO.unpack(data)
    if magic != MAGIC:
        raise RendezvousError(f"hello does not start with {MAGIC!r} (got {magic!r}): not a kvframe-nccl peer")
    return version, rank, world, digest


def encode_ok(uid: bytes) -> bytes:
    if len(uid) != ID_BYTES:
        raise ValueError(f"an NCCL unique id has {ID_BYTES} bytes; got {len(uid)}")
    return _REPLY_HEAD.pack(MAGIC, 0) + bytes(uid)


def encode_error(message: str) -> bytes:
    raw = message.encode("utf-8")[:65535]
    return _REPLY_HEAD.pack(MAGIC, 1) + struct.pack("!H", len(raw)) + raw


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RendezvousTimeout(f"timed out waiting for {what} ({len(buf)} of {n} bytes arrived)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            continue
        if not chunk:
            raise RendezvousError(f"the connection closed while waiting for {what} ({len(buf)} of {n} bytes arrived)")
        buf += chunk
    return bytes(buf)


def _bind(host: str, port: int) -> socket.socket:
    last: OSError | None = None
    for bind_host in (host, ""):
        try:
            infos = socket.getaddrinfo(bind_host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            last = exc
            continue
        for family, socktype, proto, _, addr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(128)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno == errno.EADDRINUSE:
                    raise RendezvousError(
                        f"rank 0 cannot listen on {host}:{port} for the NCCL unique id: the port is in use. Pick "
                        "a free port with KVFRAME_NCCL_ADDR=host:port (or KVFRAME_NCCL_PORT_OFFSET)") from exc
    raise RendezvousError(f"rank 0 cannot listen on {host}:{port} for the NCCL unique id: {last}")


def serve_unique_id(uid: bytes, world_size: int, host: str, port: int, timeout: float = 120.0,
                    token: str | bytes | None = None) -> None:
    """Rank 0: give ``uid`` to ranks 1..world_size-1, each once; return when all have it."""
    if world_size <= 1:
        return
    reply = encode_ok(uid)
    want = token_digest(token)
    deadline = time.monotonic() + timeout
    served: set[int] = set()
    with _bind(host, port) as server:
        while len(served) < world_size - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, world_size)) - served)
                raise RendezvousTimeout(
                    f"rank 0 timed out after {timeout:g} s waiting for ranks {missing} of {world_size} to fetch the "
                    f"NCCL unique id at {host}:{port}; check that every process was started with the same world "
                    "size and can reach this address (set KVFRAME_NCCL_ADDR=host:port)")
            server.settimeout(left)
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    hello = _recv_exact(conn, _HELLO.size, min(deadline, time.monotonic() + 10.0),
                                        f"a hello from {peer[0]}")
                    version, rank, world, digest = decode_hello(hello)
                except RendezvousError:
                    continue  # not one of ours (a port scanner, a health check): keep waiting
                problem, stranger = None, False
                if version != VERSION:
                    problem = f"rendezvous protocol version {version} is not {VERSION}: mixed kvframe-nccl versions"
                elif not hmac.compare_digest(digest, want):
                    problem, stranger = "the job's secret (KVFRAME_SECRET) differs from rank 0's", True
                elif world != world_size:
                    problem = f"rank {rank} was started with world size {world}, rank 0 with {world_size}"
                elif not 0 < rank < world_size:
                    problem = f"rank {rank} is outside 1..{world_size - 1}"
                elif rank in served:
                    problem = f"rank {rank} asked twice: two processes were started with the same rank"
                if problem is not None:
                    try:
                        conn.sendall(encode_error(problem))
                    except OSError:
                        pass
                    if stranger:  # not part of this job: keep waiting for the real ranks
                        continue
                    raise RendezvousError(f"NCCL unique-id rendezvous at {host}:{port} failed: {problem}")
                try:
                    conn.sendall(reply)
                except OSError:
                    continue  # the peer went away; it will retry
                served.add(rank)


def fetch_unique_id(rank: int, world_size: int, host: str, port: int, timeout: float = 120.0,
                    token: str | bytes | None = None) -> bytes:
    """Rank > 0: connect to rank 0 (retrying until it listens) and return the 128-byte id."""
    deadline = time.monotonic() + timeout
    hello = encode_hello(rank, world_size, token)
    last: Exception | None = None
    delay = 0.05
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RendezvousTimeout(
                f"rank {rank} timed out after {timeout:g} s fetching the NCCL unique id from rank 0 at {host}:{port} "
                f"(last error: {last}); check that rank 0 runs and that this address reaches it "
                "(set KVFRAME_NCCL_ADDR=host:port)")
        try:
            with socket.create_connection((host, port), timeout=min(left, 5.0)) as sock:
                sock.sendall(hello)
                head = _recv_exact(sock, _REPLY_HEAD.size, deadline, f"rank 0's reply at {host}:{port}")
                magic, status = _REPLY_HEAD.unpack(head)
                if magic != MAGIC:
                    raise RendezvousError(f"{host}:{port} answered {magic!r}, not {MAGIC!r}: it is not rank 0 of a "
                                          "kvframe-nccl job (check KVFRAME_NCCL_ADDR / MASTER_PORT)")
                if status == 0:
                    return _recv_exact(sock, ID_BYTES, deadline, f"the NCCL unique id from {host}:{port}")
                (n,) = struct.unpack("!H", _recv_exact(sock, 2, deadline, "rank 0's error message"))
                msg = _recv_exact(sock, n, deadline, "rank 0's error message").decode("utf-8", "replace")
                raise RendezvousError(f"rank 0 at {host}:{port} refused rank {rank}: {msg}")
        except RendezvousError:
            raise
        except OSError as exc:  # refused (rank 0 not listening yet), reset, unreachable: retry
            last = exc
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)


def exchange_unique_id(rank: int, world_size: int, host: str, port: int, make_id, timeout: float = 120.0,
                       token: str | bytes | None = None) -> bytes:
    """Rank 0 makes the id with ``make_id()`` and serves it; the others fetch it. Returns the raw bytes."""
    if rank == 0:
        uid = bytes(make_id())
        serve_unique_id(uid, world_size, host, port, timeout, token)
        return uid
    return fetch_unique_id(rank, world_size, host, port, timeout, token)


__all__ = ["RendezvousError", "RendezvousTimeout", "serve_unique_id", "fetch_unique_id", "exchange_unique_id",
           "encode_hello", "decode_hello", "encode_ok", "encode_error", "ID_BYTES"]
