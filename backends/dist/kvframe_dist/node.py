"""What servers and workers share: registering at the scheduler and the heartbeat thread."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import zmq

from kvframe.errors import KVTimeoutError, RemoteError
from kvframe_dist.env import NodeEnv
from kvframe_dist.transport import BadMessage, ZmqTransport

log = logging.getLogger("kvframe_dist")


def register(transport: ZmqTransport, sock: zmq.Socket, env: NodeEnv, role: str, addr: str = "") -> dict:
    """Register at the scheduler and wait for the welcome (rank, server addresses)."""
    hdr = {"op": "register", "role": role, "addr": addr, "host": f"{socket.gethostname()} pid {os.getpid()}"}
    if env.rank is not None:
        hdr["rank"] = env.rank
    transport.send(sock, hdr)
    deadline = time.monotonic() + env.connect_timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KVTimeoutError(
                f"{role}: timed out after {env.connect_timeout:g} s (KVFRAME_CONNECT_TIMEOUT) waiting for the "
                f"scheduler at {env.scheduler_addr} to start the job (every one of {env.num_servers} servers and "
                f"{env.num_workers} workers must register)")
        if not sock.poll(min(left, 0.5) * 1000):
            continue
        try:
            _, h, _ = transport.recv(sock)
        except BadMessage as exc:
            log.warning("dropped a message from the scheduler: %s", exc)
            continue
        if h["op"] == "welcome":
            return h
        if h["op"] == "error":
            raise RemoteError(f"{role}: the scheduler at {env.scheduler_addr} refused to start: {h.get('msg')}")


class Heartbeat(threading.Thread):
    """A worker's heartbeat thread, on its own socket to the scheduler. It records the first
    failure it learns of (a node declared stopped, or a silent scheduler) in ``failure``."""

    def __init__(self, transport: ZmqTransport, env: NodeEnv, role: str, rank: int):
        super().__init__(name=f"kvframe-heartbeat-{role}{rank}", daemon=True)
        self.transport, self.env, self.role, self.rank = transport, env, role, rank
        self.failure: str | None = None
        self.closed: dict[int, str] = {}  # workers that closed their store: rank -> name
        self._stop_ev = threading.Event()
        self.sock = transport.dealer(env.scheduler_addr)

    def stop(self) -> None:
        self._stop_ev.set()

    def run(self) -> None:
        env = self.env
        last_ack = time.monotonic()
        next_beat = 0.0
        try:
            while not self._stop_ev.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self.transport.send(self.sock, {"op": "hb", "role": self.role, "rank": self.rank})
                    next_beat = now + env.heartbeat_interval
                if self.sock.poll(min(0.1, env.heartbeat_interval) * 1000):
                    try:
                        _, h, _ = self.transport.recv(self.sock)
                    except BadMessage as exc:
                        log.warning("dropped a message from the scheduler: %s", exc)
                        continue
                    last_ack = time.monotonic()
                    if h["op"] == "closed" and isinstance(h.get("rank"), int):
                        self.closed[h["rank"]] = str(h.get("name"))
                    if h["op"] == "dead" and self.failure is None:
                        self.failure = f"kvframe dist: {h.get('msg')}"
                        log.error("%s %d: %s", self.role, self.rank, self.failure)
                elif time.monotonic() - last_ack > env.heartbeat_timeout and self.failure is None:
                    self.failure = (f"kvframe dist: the scheduler at {env.scheduler_addr} stopped: no heartbeat reply "
                                    f"for {time.monotonic() - last_ack:.1f} s (limit KVFRAME_HEARTBEAT_TIMEOUT="
                                    f"{env.heartbeat_timeout:g} s)")
                    log.error("%s %d: %s", self.role, self.rank, self.failure)
        finally:
            self.sock.close(linger=0)
