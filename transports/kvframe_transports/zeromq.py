"""Transport ``zmq``: each message is one zmq multipart message, one zmq frame per frame, on pyzmq.

One endpoint is one zmq Context.  ``listen`` binds a ROUTER socket; a sender to it is known by the
routing identity zmq gives its connection (:class:`RouterPeer`).  ``connect`` makes a DEALER socket
per call (:class:`Peer`); zmq connects it in the background, and a send waits for that connection
until ``connect_timeout`` has passed since ``connect``.

Limits: zmq's ``MAXMSGSIZE`` refuses a frame over ``max_message_bytes`` before buffering it (zmq then
drops that connection); a message whose frames are each under the limit but whose total is over it
can only be refused once zmq has received it, so it is dropped then, and its sender cut off.

Frames of at least ``zero_copy_bytes`` are handed to zmq without a copy, and ``send`` waits until zmq
has released them (its MessageTracker), at most ``send_timeout`` seconds.  Received frames are
memoryviews of zmq's own message buffers.

Broken connections: a DEALER's monitor reports its connection closing, so :meth:`ZmqTransport.broken`
knows about the peers this endpoint connected to.  zmq tells a ROUTER nothing about a peer that goes
away (stable libzmq has no ROUTER_NOTIFY); ``broken`` learns of it only when a send to it fails.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any, Literal, cast

import zmq
from pydantic import Field
from zmq.utils.monitor import recv_monitor_message

from kvframe import hookimpl
from kvframe.config import TransportConfig
from kvframe.errors import TransportError
from kvframe.protocols import Frame, Frames
from kvframe_transports.addresses import byte_view, format_address, parse_address

log = logging.getLogger("kvframe_transports")

CLOSE_LINGER_MS = 1000  # what close leaves zmq to flush messages already sent
WAIT_SLICE = 0.1  # seconds between looks at close() and the monitor during a long wait
MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED



class ZmqConfig(TransportConfig):
    type: Literal["zmq"] = "zmq"
    io_threads: int = Field(1, ge=1, le=16, description="zmq I/O threads of each endpoint")
    zero_copy_bytes: int = Field(65536, ge=0, description="frames of at least this size are sent without a copy")
    hwm: int = Field(0, ge=0, description="zmq high-water mark in messages per connection (0: unlimited)")
    send_timeout: float = Field(
        300.0, gt=0, description="seconds a send may wait for a peer that does not take its message before it fails")


class Peer:
    """The handle of an endpoint this one connected to (one DEALER socket). Hashable by identity."""

    __slots__ = ("address",)

    def __init__(self, address: str):
        self.address = address

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        return f"Peer({self.address!r}, outbound)"


class RouterPeer:
    """The handle of a peer that connected to a listening socket: its zmq routing identity there.
    Equal handles route to the same connection."""

    __slots__ = ("listener", "identity", "address")

    def __init__(self, listener: int, identity: bytes, address: str):
        self.listener = listener
        self.identity = identity
        self.address = address  # the peer's IP, for messages only

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, RouterPeer) and self.listener == other.listener
                and self.identity == other.identity)

    def __hash__(self) -> int:
        return hash((RouterPeer, self.listener, self.identity))

    def __str__(self) -> str:
        return f"{self.address} (zmq identity {self.identity.hex()})"

    def __repr__(self) -> str:
        return f"RouterPeer({self.address!r}, identity={self.identity.hex()}, inbound)"


def _events(sock: zmq.Socket) -> int:
    """``sock``'s zmq.EVENTS bits (an int option, which pyzmq types as int | bytes)."""
    return cast(int, sock.getsockopt(zmq.EVENTS))


class _Dealer:
    __slots__ = ("peer", "sock", "monitor", "deadline", "connected", "broken")

    def __init__(self, peer: Peer, sock: zmq.Socket, monitor: zmq.Socket, deadline: float):
        self.peer = peer
        self.sock = sock
        self.monitor = monitor
        self.deadline = deadline  # for the first connection
        self.connected = False
        self.broken: str | None = None


class ZmqTransport:
    """A ``zmq`` endpoint (see the module docstring). Extra public API: :meth:`broken`."""

    scheme = "tcp"

    def __init__(self, config: ZmqConfig | None = None):
        self.config = config or ZmqConfig()
        self._ctx = zmq.Context(io_threads=self.config.io_threads)
        self._lock = threading.Lock()  # held by every call that touches sockets; close waits for it
        self._close_lock = threading.Lock()
        self._closed = False
        self._routers: list[zmq.Socket] = []
        self._router_peers: dict[tuple[int, bytes], RouterPeer] = {}
        self._dealers: dict[Peer, _Dealer] = {}
        self._broken: dict[Hashable, str] = {}
        self._sources: dict[zmq.Socket, tuple[str, Any]] = {}  # what recv's poller watches
        self._poller = zmq.Poller()
        self._wake_r, self._wake_w = os.pipe()  # close() wakes a recv or send waiting in another thread
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._turn = 0  # round robin over sockets with messages waiting

    # public API --------------------------------------------------------------------------------
    def listen(self, host: str, port: int = 0) -> str:
        with self._lock:
            self._check_open()
            sock = self._socket(zmq.ROUTER, ipv6=":" in host)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer fails instead of vanishing
            bind_host = f"[{host}]" if ":" in host else host
            try:
                sock.bind(f"tcp://{bind_host}:{port or '*'}")
            except zmq.ZMQError as exc:
                sock.close(0)
                raise TransportError(f"cannot listen on {format_address(host, port)}: {exc}") from exc
            real_port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
            self._sources[sock] = ("router", len(self._routers))
            self._routers.append(sock)
            self._poller.register(sock, zmq.POLLIN)
            return format_address(host, real_port)

    def address(self, host: str, port: int) -> str:
        return format_address(host, port)

    def connect(self, address: str) -> Peer:
        host, port = parse_address(address)
        with self._lock:
            self._check_open()
            sock = self._socket(zmq.DEALER, ipv6=":" in host)
            # not IMMEDIATE: with it zmq would drop replies not yet read when the connection closes
            monitor = sock.get_monitor_socket(MONITOR_EVENTS)  # before connect: no event is missed
            try:
                sock.connect(format_address(host, port))
            except zmq.ZMQError as exc:
                sock.disable_monitor()
                monitor.close(0)
                sock.close(0)
                raise TransportError(f"cannot connect to {address}: {exc}") from exc
            peer = Peer(address)
            d = _Dealer(peer, sock, monitor, time.monotonic() + self.config.connect_timeout)
            self._dealers[peer] = d
            self._sources[sock] = ("dealer", d)
            self._sources[monitor] = ("monitor", d)
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
            return peer

    def send(self, peer: Hashable, frames: Sequence[Frame]) -> None:
        views = [byte_view(f, i) for i, f in enumerate(frames)]
        if not views:
            raise ValueError("a message needs at least one frame")
        with self._lock:
            if self._closed:
                raise TransportError(f"cannot send to {peer}: this endpoint is closed")
            d = self._dealers.get(peer) if isinstance(peer, Peer) else None
            if d is not None:
                self._await_connection(d)
                sock, head = d.sock, []
            elif isinstance(peer, RouterPeer) and self._router_peers.get((peer.listener, peer.identity)) is not None:
                reason = self._broken.get(peer)
                if reason is not None:
                    raise TransportError(f"cannot send to {peer}: {reason}")
                sock, head = self._routers[peer.listener], [peer.identity]
            else:
                reason = self._broken.get(peer)
                if reason is None:
                    raise TransportError(f"unknown peer {peer!r}: not a handle from this endpoint's connect or recv")
                raise TransportError(f"cannot send to {peer}: {reason}")
            trackers = self._put(peer, d, sock, head, views)
            self._wait_released(peer, d, trackers)

    def recv(self, timeout: float | None) -> tuple[Hashable, Frames] | None:
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
            while not self._closed:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = [s for s, _ in self._poller.poll(None if left is None else math.ceil(left * 1000))]
                if self._closed:
                    break
                got = self._take(ready)
                if got is not None:
                    return got
                if deadline is not None and time.monotonic() >= deadline:
                    break
            return None

    def broken(self, peer: Hashable) -> str | None:
        """Why the connection to ``peer`` broke, or None while it works (or for an unknown handle, or
        for a peer that connected here and went away without a send to it failing: zmq cannot tell).
        ``recv`` never raises for a broken peer; a caller that waits for a reply asks this."""
        with self._lock:
            d = self._dealers.get(peer) if isinstance(peer, Peer) and not self._closed else None
            if d is not None and d.broken is None:
                self._drain_monitor(d)
                if not d.connected and time.monotonic() > d.deadline:
                    self._connect_failed(d)
            return self._broken.get(peer)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # full: a wake-up is pending anyway
                pass
        with self._lock:  # a recv or send in another thread has noticed and let go
            for p in [*self._dealers, *self._router_peers.values()]:
                self._broken.setdefault(p, "the endpoint closed")
            self._ctx.destroy(linger=CLOSE_LINGER_MS)
            self._sources.clear()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> ZmqTransport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # sockets -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("this endpoint is closed")

    def _socket(self, kind: int, ipv6: bool) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)  # per frame, before buffering it
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)  # so that a vanished host is noticed
        if ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        return sock

    def _drain_monitor(self, d: _Dealer) -> None:
        while d.sock is not None and _events(d.monitor) & zmq.POLLIN:
            event = recv_monitor_message(d.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                d.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                # the socket is kept until recv has handed out what came before (see _take)
                self._fail(d, "the connection closed (the peer closed it, went away, or refused a message)")

    def _fail(self, d: _Dealer, reason: str) -> None:
        if d.broken is None:
            d.broken = reason
            self._broken[d.peer] = reason
            log.debug("connection to %s ended: %s", d.peer, reason)

    def _connect_failed(self, d: _Dealer) -> None:
        self._fail(d, f"cannot connect within connect_timeout={self.config.connect_timeout} s")
        self._close_dealer(d)  # never connected: nothing can be waiting in it

    def _close_dealer(self, d: _Dealer) -> None:
        """Drop a broken DEALER: zmq would otherwise keep reconnecting it (and hold its messages)."""
        if d.sock is None:
            return
        for s in (d.sock, d.monitor):
            self._poller.unregister(s)
            self._sources.pop(s, None)
        d.sock.disable_monitor()
        d.monitor.close(0)
        d.sock.close(0)
        d.sock = d.monitor = None  # type: ignore[assignment]  # closed: only "is None" looks at them now
        del self._dealers[d.peer]

    # sending -----------------------------------------------------------------------------------
    def _await_connection(self, d: _Dealer) -> None:
        """Wait for the DEALER's first connection, until ``connect_timeout`` after ``connect``."""
        self._drain_monitor(d)
        while d.broken is None and not d.connected:
            left = d.deadline - time.monotonic()
            if left <= 0:
                self._connect_failed(d)
                break
            self._wait({d.monitor: zmq.POLLIN}, min(left, WAIT_SLICE * 10))
            self._drain_monitor(d)
        if d.broken is not None:
            raise TransportError(f"cannot send to {d.peer}: {d.broken}")

    def _wait(self, sockets: dict[zmq.Socket, int], seconds: float) -> None:
        """Poll ``sockets`` (and close's wake-up) for at most ``seconds``; raise once closed."""
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        for s, flags in sockets.items():
            poller.register(s, flags)
        poller.poll(int(seconds * 1000))  # what pyzmq does with a float
        if self._closed:
            raise TransportError("this endpoint is closed")

    def _put(self, peer: Hashable, d: _Dealer | None, sock: zmq.Socket, head: list[bytes],
             views: list[memoryview]) -> list[zmq.MessageTracker]:
        """Hand one message to zmq; the trackers of its zero-copy frames."""
        parts: list = [*head, *views]
        last, zc = len(parts) - 1, self.config.zero_copy_bytes
        trackers: list[zmq.MessageTracker] = []
        stalled_since, pause = None, 0.001
        i = 0
        while i <= last:
            part = parts[i]
            flags = zmq.NOBLOCK | (zmq.SNDMORE if i < last else 0)
            try:
                if i >= len(head) and 0 < part.nbytes and part.nbytes >= zc:
                    trackers.append(sock.send(part, flags, copy=False, track=True))
                else:
                    sock.send(part, flags, copy=True)
            except zmq.Again:
                if i > 0:  # zmq takes the rest of a message once it took its first frame
                    self._send_failed(peer, d, "zmq refused a frame in the middle of a message")
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > self.config.send_timeout:
                    self._send_failed(peer, d, f"no progress for {self.config.send_timeout} s "
                                               "(the peer stopped reading)")
                if d is not None:
                    self._wait({sock: zmq.POLLOUT, d.monitor: zmq.POLLIN}, WAIT_SLICE)
                    self._drain_monitor(d)
                    if d.broken is not None:
                        raise TransportError(f"cannot send to {peer}: {d.broken}") from None
                else:  # a ROUTER is writable when any peer is: back off instead
                    self._wait({}, pause)
                    pause = min(pause * 2, WAIT_SLICE)
                continue
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self._send_failed(peer, d, "it is no longer connected")
                self._send_failed(peer, d, f"zmq: {exc}")
            i += 1
        return trackers

    def _wait_released(self, peer: Hashable, d: _Dealer | None, trackers: list[zmq.MessageTracker]) -> None:
        """Return once zmq no longer reads the caller's buffers."""
        deadline = time.monotonic() + self.config.send_timeout
        for tracker in trackers:
            while not tracker.done:
                if self._closed:
                    raise TransportError(f"cannot send to {peer}: this endpoint is closed")
                if d is not None:
                    self._drain_monitor(d)
                    if d.broken is not None:
                        self._close_dealer(d)  # zmq would keep the message for a reconnection
                        raise TransportError(f"cannot send to {peer}: {d.broken}")
                if time.monotonic() > deadline:
                    self._send_failed(peer, d, f"zmq still holds the message after {self.config.send_timeout} s "
                                               "(the peer stopped reading)")
                try:
                    tracker.wait(WAIT_SLICE)
                except zmq.NotDone:
                    pass

    def _send_failed(self, peer: Hashable, d: _Dealer | None, reason: str) -> None:
        if d is not None:
            self._fail(d, reason)
            self._close_dealer(d)  # releases what zmq still holds of the message
        else:
            self._broken[peer] = reason
            log.debug("connection to %s ended: %s", peer, reason)
        raise TransportError(f"cannot send to {peer}: {reason}")

    # receiving ---------------------------------------------------------------------------------
    def _take(self, ready: list[Any]) -> tuple[Hashable, Frames] | None:
        """One message from the sockets poll found ready, or None (nothing, or only dropped ones)."""
        data: list[zmq.Socket] = []
        for s in ready:
            if s == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
                continue
            source = self._sources.get(s)
            if source is None:
                continue
            if source[0] == "monitor":
                self._drain_monitor(source[1])
            else:
                data.append(s)
        # a broken DEALER is closed once it has nothing left that came before the break (asked now:
        # the poll may have looked at it just before the last of that came)
        for d in [d for d in self._dealers.values() if d.broken is not None and d.sock not in data]:
            if _events(d.sock) & zmq.POLLIN:
                data.append(d.sock)
            else:
                self._close_dealer(d)
        if not data:
            return None
        self._turn += 1
        for k in range(len(data)):
            sock = data[(self._turn + k) % len(data)]
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            kind, obj = self._sources[sock]
            got = self._from_router(obj, parts) if kind == "router" else self._from_dealer(obj, parts)
            if got is not None:
                return got
        return None

    def _too_big(self, parts: list[zmq.Frame]) -> str | None:
        total = sum(len(p) for p in parts)
        limit = self.config.max_message_bytes
        return f"a message of {total} bytes is over the limit of {limit} bytes" if total > limit else None

    def _from_router(self, listener: int, parts: list[zmq.Frame]) -> tuple[Hashable, Frames] | None:
        ident, frames = parts[0].bytes, parts[1:]
        peer = self._router_peers.get((listener, ident))
        if peer is None:
            try:
                address = cast(str, parts[-1].get("Peer-Address"))
            except zmq.ZMQError:
                address = "?"
            peer = self._router_peers[(listener, ident)] = RouterPeer(listener, ident, address)
        if peer in self._broken or not frames:  # cut off (or an empty envelope: not a kvframe peer)
            return None
        problem = self._too_big(frames)
        if problem is not None:  # zmq cannot drop one peer of a ROUTER: ignore it from now on
            self._broken[peer] = f"dropped: {problem}"
            log.warning("dropping a message from %s and ignoring that peer from now on: %s", peer, problem)
            return None
        return peer, [f.buffer for f in frames]

    def _from_dealer(self, d: _Dealer, parts: list[zmq.Frame]) -> tuple[Hashable, Frames] | None:
        problem = self._too_big(parts)
        if problem is not None:
            log.warning("dropping the connection with %s: %s", d.peer, problem)
            self._fail(d, f"dropped: {problem}")
            self._close_dealer(d)
            return None
        return d.peer, [f.buffer for f in parts]


def make_transport(config: ZmqConfig) -> ZmqTransport:
    return ZmqTransport(config)


@hookimpl
def kvframe_register_transports(register):
    register("zmq", make_transport, ZmqConfig)
