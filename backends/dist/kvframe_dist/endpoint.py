"""A role's messaging: a transport plugin below, authenticated typed messages above.

The roles never touch a transport directly: they make an :class:`Endpoint` with the transport
named by the job (``KVFRAME_TRANSPORT``, ``[store] transport`` or ``create(..., transport=)``)
and send and receive :class:`~kvframe_dist.wire.Message` objects. Every connection first runs the
handshake of :mod:`kvframe_dist.session`; a peer that fails it is told why (``refused``), then
disconnected, and nothing it sends reaches the role.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable
from typing import Any

from kvframe import plugins
from kvframe.errors import KVTimeoutError, TransportError
from kvframe.plugins import validate_plugin_config
from kvframe.protocols import Transport
from kvframe_dist.session import Session, hello_key, new_nonce
from kvframe_dist.wire import BadMessage, Message, decode, encode

log = logging.getLogger("kvframe_dist")


def role_transport(env: Any) -> Transport:
    """The job's transport for a role: a send that makes no progress for twice the heartbeat
    timeout fails (the peer is gone), so no role stays blocked on a dead link."""
    return make_transport(env.transport, {"send_timeout": max(2 * env.heartbeat_timeout, 5.0)})


def make_transport(name: str, options: dict[str, Any] | None = None) -> Transport:
    """A transport plugin built from its validated config."""
    config = validate_plugin_config("transports", {"type": name, **(options or {})}, f"transport {name!r}")
    transport = plugins.create("transports", config)
    if not isinstance(transport, Transport):
        raise TypeError(f"the transport plugin {name!r} does not implement kvframe.protocols.Transport "
                        "(listen, address, connect, send, recv, close)")
    return transport


class Refused(TransportError):
    """The peer refused this endpoint's handshake (its reason, unauthenticated, is in the message)."""


class Endpoint:
    """Sends and receives checked messages over authenticated sessions; drops (and counts) the rest."""

    def __init__(self, transport: Transport, secret: bytes | None, owner: str, mac_data: bool = False):
        self.transport = transport
        self.secret = secret
        self.mac_data = mac_data  # the MAC covers data bytes too (KVFRAME_MAC_DATA): every node the same
        self.owner = owner  # "worker 1": for log lines
        self.dropped = 0
        self.names: dict[Hashable, str] = {}  # peer -> address, for messages
        self._hello_key = hello_key(secret)
        self._sessions: dict[Hashable, Session] = {}
        self._waiting: dict[Hashable, str] = {}  # peers we said hello to -> our nonce
        self._early: deque[tuple[Hashable, Message]] = deque()  # came while a connect waited

    def listen(self, host: str, port: int = 0) -> str:
        return self.transport.listen(host, port)

    def connect_to(self, host: str, port: int) -> Hashable:
        """Connect to the endpoint listening at ``host:port`` (the scheduler, known only so)."""
        return self.connect(self.transport.address(host, port))

    def connect(self, address: str) -> Hashable:
        """Connect and run the handshake; raises :class:`Refused` with the peer's reason, or
        KVTimeoutError when no answer comes within the transport's connect timeout."""
        log.debug("%s: connecting to %s", self.owner, address)
        peer = self.transport.connect(address)
        self.names[peer] = address
        nonce = new_nonce()
        self._waiting[peer] = nonce
        hello = Message("hello", {"nonce": nonce, "role": self.owner, "mac_data": self.mac_data})
        self.transport.send(peer, encode(hello, self._hello_key))
        limit = float(getattr(self.transport.config, "connect_timeout", 30.0))
        deadline = time.monotonic() + limit
        while peer not in self._sessions:
            left = deadline - time.monotonic()
            if left <= 0:
                self._waiting.pop(peer, None)
                raise KVTimeoutError(f"{self.owner}: {address} did not answer the handshake within {limit:g} s")
            got = self.transport.recv(min(left, 0.5))
            if got is not None:
                msg = self._accept(*got)
                if msg is not None:
                    self._early.append((got[0], msg))
            why = self.broken(peer)
            if why and peer not in self._sessions:
                self._waiting.pop(peer, None)
                raise TransportError(f"{self.owner}: the connection to {address} broke during the handshake: {why}")
        log.debug("%s: connected to %s (authenticated session)", self.owner, address)
        return peer

    def send(self, peer: Hashable, msg: Message) -> None:
        """Raises TransportError when the peer cannot be reached."""
        session = self._sessions.get(peer)
        if session is None:
            raise TransportError(f"{self.owner}: no session with {self.name(peer)}")
        frames = encode(msg, session.send_key, session.send_seq, self.mac_data)
        session.send_seq += 1
        self.transport.send(peer, frames)

    def try_send(self, peer: Hashable, msg: Message) -> bool:
        """Send where a failure is not this role's to report (the peer's liveness is watched elsewhere)."""
        try:
            self.send(peer, msg)
            return True
        except TransportError as exc:
            log.debug("%s: send of %s to %s failed: %s", self.owner, msg.op, self.name(peer), exc)
            return False

    def recv(self, timeout: float) -> tuple[Hashable, Message] | None:
        """The next good message within ``timeout`` seconds, or None."""
        if self._early:
            return self._early.popleft()
        deadline = time.monotonic() + timeout
        while True:
            got = self.transport.recv(max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            msg = self._accept(*got)
            if msg is not None:
                return got[0], msg
            if time.monotonic() >= deadline:
                return None

    # the handshake and the checks --------------------------------------------------------------
    def _accept(self, peer: Hashable, frames: list) -> Message | None:
        """A message of an established session, or None (a handshake step, or dropped)."""
        session = self._sessions.get(peer)
        if session is not None:
            try:
                msg = decode(frames, session.recv_key, session.recv_seq, self.mac_data)
            except BadMessage as exc:
                self._drop(peer, exc)
                return None
            session.recv_seq += 1
            return msg
        if peer in self._waiting:
            self._answered(peer, frames)
            return None
        self._hello(peer, frames)
        return None

    def _hello(self, peer: Hashable, frames: list) -> None:
        """A new inbound connection: its first message must be a valid hello."""
        try:
            msg = decode(frames, self._hello_key)
            if msg.op != "hello":
                raise BadMessage(f"a connection must start with 'hello', not {msg.op!r}")
            if msg["mac_data"] != self.mac_data:
                raise BadMessage(f"KVFRAME_MAC_DATA differs: {int(msg['mac_data'])} there, {int(self.mac_data)} here")
        except BadMessage as exc:
            self._refuse(peer, f"authentication failed: {exc}" if self.secret is not None else str(exc))
            return
        nonce = new_nonce()
        ack = Message("hello_ack", {"nonce": nonce, "echo": msg["nonce"]})
        try:
            self.transport.send(peer, encode(ack, self._hello_key))
        except TransportError as exc:
            log.debug("%s: hello_ack to %s failed: %s", self.owner, self.name(peer), exc)
            return
        self._sessions[peer] = Session.derive(self.secret, msg["nonce"], nonce, client=False)
        self.names.setdefault(peer, f"{msg['role']} ({peer})")
        log.debug("%s: accepted a connection from %s", self.owner, self.name(peer))

    def _answered(self, peer: Hashable, frames: list) -> None:
        """The answer to our hello: an ack echoing our nonce, or a refusal."""
        try:
            msg = decode(frames, self._hello_key)
        except BadMessage as exc:
            try:  # a refusal comes without a MAC: the refusing side could not trust us
                plain = decode(frames)
            except BadMessage:
                plain = None
            if plain is not None and plain.op == "refused":
                self._waiting.pop(peer, None)
                raise Refused(f"{self.owner}: {self.name(peer)} refused the connection: {plain['msg']}") from None
            self._drop(peer, exc)
            return
        if msg.op == "refused":
            self._waiting.pop(peer, None)
            raise Refused(f"{self.owner}: {self.name(peer)} refused the connection: {msg['msg']}")
        if msg.op != "hello_ack" or msg["echo"] != self._waiting[peer]:
            self._drop(peer, BadMessage("an answer to our hello that does not echo its nonce"))
            return
        self._sessions[peer] = Session.derive(self.secret, self._waiting.pop(peer), msg["nonce"], client=True)

    def _refuse(self, peer: Hashable, reason: str) -> None:
        """Tell a peer that failed the handshake why (unauthenticated: it has no key), then drop it."""
        self._drop(peer, BadMessage(reason))
        try:
            self.transport.send(peer, encode(Message("refused", {"msg": f"{self.owner}: {reason}"[:1000]})))
        except TransportError:
            pass
        disconnect = getattr(self.transport, "disconnect", None)
        if disconnect is not None:
            disconnect(peer)

    def _drop(self, peer: Hashable, exc: Exception) -> None:
        self.dropped += 1
        if self.dropped <= 20 or self.dropped % 1000 == 0:  # a flood must not flood the log
            log.warning("%s dropped a message from %s: %s (%d dropped)", self.owner, self.name(peer), exc,
                        self.dropped)

    # the rest ------------------------------------------------------------------------------------
    def broken(self, peer: Hashable) -> str | None:
        """Why the connection to ``peer`` broke, where the transport can tell."""
        check = getattr(self.transport, "broken", None)
        return check(peer) if check is not None else None

    def name(self, peer: Hashable) -> str:
        return self.names.get(peer) or str(peer)

    def close(self) -> None:
        self.transport.close()
