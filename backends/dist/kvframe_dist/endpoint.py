"""A role's messaging: a transport plugin below, typed messages (:mod:`kvframe_dist.wire`) above.

The roles never touch a transport directly: they make an :class:`Endpoint` with the transport
named by the job (``KVFRAME_TRANSPORT``, ``[store] transport`` or ``create(..., transport=)``)
and send and receive :class:`~kvframe_dist.wire.Message` objects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from typing import Any

from kvframe import plugins
from kvframe.config import validate_plugin_config
from kvframe.errors import TransportError
from kvframe.protocols import Transport
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
                        "(listen, connect, send, recv, close)")
    return transport


class Endpoint:
    """Sends and receives checked messages; drops (and counts) what fails :func:`wire.decode`."""

    def __init__(self, transport: Transport, secret: bytes | None, owner: str):
        self.transport = transport
        self.secret = secret
        self.owner = owner  # "worker 1": for log lines
        self.dropped = 0
        self.names: dict[Hashable, str] = {}  # peer -> address, for messages

    def listen(self, host: str, port: int = 0) -> str:
        return self.transport.listen(host, port)

    def connect(self, address: str) -> Hashable:
        peer = self.transport.connect(address)
        self.names[peer] = address
        return peer

    def send(self, peer: Hashable, msg: Message) -> None:
        """Raises TransportError when the peer cannot be reached."""
        self.transport.send(peer, encode(msg, self.secret))

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
        deadline = time.monotonic() + timeout
        while True:
            got = self.transport.recv(max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            peer, frames = got
            try:
                return peer, decode(frames, self.secret)
            except BadMessage as exc:
                self.dropped += 1
                if self.dropped <= 20 or self.dropped % 1000 == 0:  # a flood must not flood the log
                    log.warning("%s dropped a message from %s: %s (%d dropped)", self.owner, self.name(peer), exc,
                                self.dropped)
            if time.monotonic() >= deadline:
                return None

    def broken(self, peer: Hashable) -> str | None:
        """Why the connection to ``peer`` broke, where the transport can tell."""
        check = getattr(self.transport, "broken", None)
        return check(peer) if check is not None else None

    def name(self, peer: Hashable) -> str:
        return self.names.get(peer) or str(peer)

    def close(self) -> None:
        self.transport.close()
