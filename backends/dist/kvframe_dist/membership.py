"""Joining a job and staying in it: registration at the scheduler, heartbeats, and naming who failed.

A node that stops hearing the scheduler first looks at its own network link: when the interface
holding its address is down, the message says so (the scheduler is then not the culprit).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Hashable

from kvframe.errors import KVTimeoutError, RemoteError
from kvframe_dist.address import interface_of, link_state, route_address
from kvframe_dist.endpoint import Endpoint, role_transport
from kvframe_dist.env import NodeEnv
from kvframe_dist.wire import Message

log = logging.getLogger("kvframe_dist")


def register(ep: Endpoint, sched: Hashable, env: NodeEnv, role: str, addr: str = "",
             early: list | None = None) -> Message:
    """Register at the scheduler and wait for the welcome (rank, server addresses). Messages from
    other peers that come first (a worker welcomed before this server) are kept in ``early``."""
    fields: dict = {"role": role, "addr": addr, "host": f"{socket.gethostname()} pid {os.getpid()}"}
    if env.rank is not None:
        fields["rank"] = env.rank
    log.debug("%s: registering at the scheduler %s%s", role, env.scheduler_addr,
              f" as rank {env.rank}" if env.rank is not None else "")
    ep.send(sched, Message("register", fields))
    deadline = time.monotonic() + env.connect_timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KVTimeoutError(
                f"{role}: timed out after {env.connect_timeout:g} s (KVFRAME_CONNECT_TIMEOUT) waiting for the "
                f"scheduler at {env.scheduler_addr} to start the job (every one of {env.num_servers} servers and "
                f"{env.num_workers} workers must register; every node must use the same transport, here "
                f"{env.transport!r})")
        got = ep.recv(min(left, 0.5))
        if got is None:
            continue
        if got[0] != sched:
            if early is not None:
                early.append(got)
            continue
        msg = got[1]
        if msg.op == "welcome":
            log.debug("%s: welcomed as rank %s (%s workers, %s servers)", role, msg.get("rank"),
                      msg.get("num_workers"), msg.get("num_servers"))
            return msg
        if msg.op == "error":
            raise RemoteError(f"{role}: the scheduler at {env.scheduler_addr} refused to start: {msg['msg']}")


def own_address(env: NodeEnv) -> str | None:
    """This host's address towards the scheduler, found while the link is up (for naming it later)."""
    try:
        return route_address(env.root_uri, env.root_port)
    except (OSError, ValueError):
        return None


def silent_scheduler(env: NodeEnv, role: str, rank: int, silent_for: float, mine: str | None) -> str:
    """What to say when the scheduler stopped answering: this host's link, or the scheduler."""
    try:
        iface = interface_of(mine) if mine else None
        state = link_state(mine) if mine else None
    except (OSError, ValueError):
        iface = state = None
    if iface is not None and state is not None and state != "up":
        return (f"kvframe dist: {role} {rank} lost its own network link: interface {iface} ({mine}) is {state}; "
                f"nothing from the scheduler at {env.scheduler_addr} for {silent_for:.1f} s")
    return (f"kvframe dist: the scheduler at {env.scheduler_addr} stopped or cannot be reached: no heartbeat reply "
            f"for {silent_for:.1f} s (limit KVFRAME_HEARTBEAT_TIMEOUT={env.heartbeat_timeout:g} s)")


class Heartbeat(threading.Thread):
    """A node's heartbeat thread (a worker's or a server's), on an endpoint of its own, so that the
    node's own sends, blocked however long, never silence it at the scheduler. It records the first
    failure it learns of (a node declared stopped, or a silent scheduler) in ``failure``."""

    def __init__(self, env: NodeEnv, role: str, rank: int, on_failure: Callable[[], None] | None = None):
        super().__init__(name=f"kvframe-heartbeat-{role}{rank}", daemon=True)
        self.env, self.role, self.rank = env, role, rank
        self.on_failure = on_failure  # e.g. close the node's own endpoint: a send blocked on a dead link ends
        self.failure: str | None = None
        self.closed: dict[int, str] = {}  # workers that closed their store: rank -> name
        self._stop_ev = threading.Event()
        self.ep = Endpoint(role_transport(env), env.secret, f"{role} {rank} heartbeat", env.mac_data)
        self.sched = self.ep.connect_to(env.root_uri, env.root_port)
        self.mine = own_address(env)

    def stop(self) -> None:
        self._stop_ev.set()

    def _fail(self, text: str) -> None:
        if self.failure is None:
            self.failure = text
            log.error("%s %d: %s", self.role, self.rank, text)
            if self.on_failure is not None:
                self.on_failure()

    def run(self) -> None:
        env = self.env
        last_ack = time.monotonic()
        next_beat = 0.0
        log.debug("%s %d: heartbeats every %g s", self.role, self.rank, env.heartbeat_interval)
        try:
            while not self._stop_ev.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self.ep.try_send(self.sched, Message("hb", {"role": self.role, "rank": self.rank}))
                    next_beat = now + env.heartbeat_interval
                got = self.ep.recv(min(0.1, env.heartbeat_interval))
                if got is not None:
                    last_ack = time.monotonic()
                    msg = got[1]
                    if msg.op == "closed":
                        self.closed[msg["rank"]] = msg["name"]
                    elif msg.op == "dead":
                        self._fail(f"kvframe dist: {msg['msg']}")
                elif time.monotonic() - last_ack > env.heartbeat_timeout:
                    self._fail(silent_scheduler(env, self.role, self.rank, time.monotonic() - last_ack, self.mine))
        finally:
            self.ep.close()
