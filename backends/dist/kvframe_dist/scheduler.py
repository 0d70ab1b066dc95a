"""The scheduler: rendezvous, rank assignment, barriers and liveness.

Every node registers on the scheduler's ROUTER; once all ``num_servers + num_workers`` have come,
each gets a ``welcome`` with its rank and the servers' addresses.  Nodes then send heartbeats;
a node silent for ``heartbeat_timeout`` seconds is declared stopped and every other node is told
(role, rank, address), after which the scheduler exits with status 1.  When every worker has
closed its store the scheduler stops the servers and exits 0.

Run on its own with ``python -m kvframe_dist.scheduler`` (environment as for MXNet).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import zmq

from kvframe_dist.env import NodeEnv, run_role
from kvframe_dist.transport import BadMessage, ZmqTransport

log = logging.getLogger("kvframe_dist.scheduler")


@dataclass
class Node:
    role: str
    ident: bytes
    asked_rank: int | None
    addr: str = ""
    host: str = ""
    rank: int = -1
    hb_ident: bytes | None = None
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False

    def name(self) -> str:
        where = f" at {self.addr}" if self.addr else (f" on {self.host}" if self.host else "")
        return f"{self.role} {self.rank}{where}"


class Scheduler:
    def __init__(self, env: NodeEnv, transport: ZmqTransport | None = None):
        self.env = env
        self.transport = transport or ZmqTransport(secret=env.secret)
        host = env.root_uri if env.loopback else "*"
        if host == "localhost":
            host = "127.0.0.1"
        self.sock, self.addr = self.transport.router(f"tcp://{host}:{env.root_port}")
        self.nodes: dict[bytes, Node] = {}
        self.by_hb: dict[bytes, Node] = {}
        self.started = False
        self.barrier_waiting: list[tuple[bytes, object]] = []
        self.stopping_since: float | None = None
        self.exit_code: int | None = None

    # helpers ---------------------------------------------------------------------------------
    def _send(self, ident: bytes, header: dict) -> None:
        try:
            self.transport.send(self.sock, header, ident=ident)
        except zmq.ZMQError as exc:  # peer gone: liveness handles it
            log.debug("send to %r failed: %s", ident, exc)

    def _workers(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == "worker"]

    def _servers(self) -> list[Node]:
        return sorted((n for n in self.nodes.values() if n.role == "server"), key=lambda n: n.rank)

    def _assign(self, nodes: list[Node], count: int) -> None:
        taken = {n.asked_rank for n in nodes if n.asked_rank is not None and 0 <= n.asked_rank < count}
        used: set[int] = set()
        free = iter(r for r in range(count) if r not in taken)
        for n in nodes:
            if n.asked_rank is not None and 0 <= n.asked_rank < count and n.asked_rank not in used:
                n.rank = n.asked_rank
            else:
                n.rank = next(free)
            used.add(n.rank)

    # message handling ------------------------------------------------------------------------
    def _register(self, ident: bytes, h: dict) -> None:
        role = h.get("role")
        if role not in ("worker", "server"):
            self._send(ident, {"op": "error", "msg": f"cannot register role {role!r}"})
            return
        want = self.env.num_workers if role == "worker" else self.env.num_servers
        have = [n for n in self.nodes.values() if n.role == role]
        if self.started or len(have) >= want:
            self._send(ident, {"op": "error", "msg": f"the job already has its {want} {role}s (DMLC_NUM_"
                                                     f"{'WORKER' if role == 'worker' else 'SERVER'}={want})"})
            return
        rank = h.get("rank")
        self.nodes[ident] = Node(role, ident, rank if isinstance(rank, int) else None,
                                 addr=str(h.get("addr", "")), host=str(h.get("host", "")))
        if len(self._workers()) == self.env.num_workers and len(self._servers()) == self.env.num_servers:
            self._start()

    def _start(self) -> None:
        self._assign(self._workers(), self.env.num_workers)
        self._assign(self._servers(), self.env.num_servers)
        servers = [n.addr for n in self._servers()]
        now = time.monotonic()
        for n in self.nodes.values():
            n.last_seen = now
            self._send(n.ident, {"op": "welcome", "rank": n.rank, "servers": servers, "pid": os.getpid(),
                                 "num_workers": self.env.num_workers, "num_servers": self.env.num_servers})
        self.started = True
        log.info("all %d servers and %d workers registered; servers at %s", self.env.num_servers,
                 self.env.num_workers, servers)

    def _heartbeat(self, ident: bytes, h: dict) -> None:
        node = self.nodes.get(ident) or self.by_hb.get(ident)
        if node is None:  # a worker's heartbeat socket introduces itself with role and rank
            node = next((n for n in self.nodes.values() if n.role == h.get("role") and n.rank == h.get("rank")), None)
            if node is None:
                return
            node.hb_ident = ident
            self.by_hb[ident] = node
            for w in self._workers():  # workers that closed before this heartbeat socket introduced itself
                if w.closed and node.role == "worker":
                    self._send(ident, {"op": "closed", "rank": w.rank, "name": w.name()})
        node.last_seen = time.monotonic()
        self._send(ident, {"op": "hb"})

    def _barrier(self, ident: bytes, h: dict) -> None:
        node = self.nodes.get(ident)
        if node is None or node.role != "worker":
            self._send(ident, {"op": "error", "id": h.get("id"),
                               "msg": "only registered workers take part in barriers"})
            return
        gone = [n for n in self._workers() if n.closed]
        if gone:
            self._send(ident, {"op": "error", "id": h.get("id"), "msg": self._gone_msg(gone)})
            return
        self.barrier_waiting.append((ident, h.get("id")))
        if len(self.barrier_waiting) == self.env.num_workers:
            for who, rid in self.barrier_waiting:
                self._send(who, {"op": "barrier_done", "id": rid})
            self.barrier_waiting = []

    @staticmethod
    def _gone_msg(gone: list[Node]) -> str:
        names = ", ".join(n.name() for n in gone)
        return (f"barrier can never complete: {names} already closed its store (finished early); every worker "
                "must reach the same barriers")

    def _bye(self, ident: bytes, h: dict) -> None:
        node = self.nodes.get(ident)
        if node is None:
            return
        node.closed = True
        self._send(ident, {"op": "bye", "id": h.get("id")})
        if node.role == "worker":
            log.info("worker %d closed", node.rank)
            for w in self._workers():  # a sync round waiting for this worker's push can never complete
                if not w.closed and w.hb_ident is not None:
                    self._send(w.hb_ident, {"op": "closed", "rank": node.rank, "name": node.name()})
            if self.barrier_waiting:
                msg = self._gone_msg([node])
                for who, rid in self.barrier_waiting:
                    self._send(who, {"op": "error", "id": rid, "msg": msg})
                self.barrier_waiting = []
            if all(w.closed for w in self._workers()):
                for s in self._servers():
                    self._send(s.ident, {"op": "stop"})
                self.stopping_since = time.monotonic()

    def _declare_dead(self, node: Node, reason: str) -> None:
        msg = f"{node.name()} stopped: {reason}"
        log.error("%s; telling every other node and stopping", msg)
        notice = {"op": "dead", "role": node.role, "rank": node.rank, "addr": node.addr or node.host, "msg": msg}
        for n in self.nodes.values():
            if n is node or n.closed:
                continue
            self._send(n.hb_ident or n.ident, notice)
            if n.hb_ident is not None:
                self._send(n.ident, notice)
        self.exit_code = 1

    def _check_liveness(self) -> None:
        now = time.monotonic()
        limit = self.env.heartbeat_timeout
        for n in self.nodes.values():
            if not n.closed and now - n.last_seen > limit:
                self._declare_dead(n, f"no heartbeat for {now - n.last_seen:.1f} s (limit "
                                      f"KVFRAME_HEARTBEAT_TIMEOUT={limit:g} s)")
                return

    # main loop -------------------------------------------------------------------------------
    def run(self) -> int:
        log.info("scheduler listening at %s for %d servers and %d workers", self.addr, self.env.num_servers,
                 self.env.num_workers)
        begin = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        tick = min(0.25, self.env.heartbeat_interval)
        try:
            while self.exit_code is None:
                if poller.poll(tick * 1000):
                    while True:
                        try:
                            ident, h, _ = self.transport.recv(self.sock, router=True)
                        except zmq.Again:
                            break
                        except BadMessage as exc:
                            log.warning("dropped a message: %s", exc)
                            continue
                        self._dispatch(ident, h)
                        if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                            break
                if not self.started:
                    if time.monotonic() - begin > self.env.connect_timeout:
                        nw, ns = len(self._workers()), len(self._servers())
                        msg = (f"only {nw} of {self.env.num_workers} workers and {ns} of {self.env.num_servers} "
                               f"servers registered at the scheduler {self.addr} within KVFRAME_CONNECT_TIMEOUT="
                               f"{self.env.connect_timeout:g} s")
                        log.error(msg)
                        for n in self.nodes.values():
                            self._send(n.ident, {"op": "error", "msg": msg})
                        self.exit_code = 1
                    continue
                if self.stopping_since is not None:
                    servers_done = all(s.closed for s in self._servers())
                    if servers_done or time.monotonic() - self.stopping_since > 5:
                        self.exit_code = 0
                        break
                self._check_liveness()
        finally:
            time.sleep(0.2)  # let the last notices leave
            self.sock.close(linger=1000)
            self.transport.close()
        return self.exit_code or 0

    def _dispatch(self, ident: bytes, h: dict) -> None:
        op = h["op"]
        node = self.nodes.get(ident)
        if node is not None:
            node.last_seen = time.monotonic()
        if op == "register":
            self._register(ident, h)
        elif op == "hb":
            self._heartbeat(ident, h)
        elif op == "barrier":
            self._barrier(ident, h)
        elif op == "bye":
            self._bye(ident, h)
        else:
            log.warning("dropped a message with unknown op %r from %r", op, ident)


def main(argv: list[str] | None = None) -> int:
    return run_role("scheduler", lambda env: Scheduler(env).run())


if __name__ == "__main__":
    sys.exit(main())
