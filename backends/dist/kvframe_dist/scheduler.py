"""The scheduler: rendezvous, rank assignment, barriers and liveness.

Every node registers at the scheduler's endpoint; once all ``num_servers + num_workers`` have come,
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
from collections.abc import Hashable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from kvframe.errors import TransportError
from kvframe_dist.address import is_loopback
from kvframe_dist.endpoint import Endpoint, role_transport
from kvframe_dist.env import NodeEnv, run_role
from kvframe_dist.wire import Message

log = logging.getLogger("kvframe_dist.scheduler")


@dataclass
class Node:
    role: str
    ident: Hashable  # the peer handle of its registration connection
    asked_rank: int | None
    addr: str = ""
    host: str = ""
    rank: int = -1
    hb_ident: Hashable | None = None  # a worker's heartbeat endpoint
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False

    def name(self) -> str:
        where = f" at {self.addr}" if self.addr else (f" on {self.host}" if self.host else "")
        return f"{self.role} {self.rank}{where}"


class Scheduler:
    def __init__(self, env: NodeEnv):
        self.env = env
        self.ep = Endpoint(role_transport(env), env.secret, "scheduler", env.mac_data)
        # the scheduler binds the address it is known by (DMLC_PS_ROOT_URI), never every interface
        self.addr = self.ep.listen("127.0.0.1" if env.root_uri == "localhost" else env.root_uri, env.root_port)
        self.nodes: dict[Hashable, Node] = {}
        self.by_hb: dict[Hashable, Node] = {}
        self.started = False
        self.barrier_waiting: list[tuple[Hashable, int]] = []
        self.stopping_since: float | None = None
        self.exit_code: int | None = None

    # helpers ---------------------------------------------------------------------------------
    def _send(self, ident: Hashable, op: str, **fields: object) -> None:
        self.ep.try_send(ident, Message(op, fields))  # a peer gone is found by liveness

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
    def _register(self, ident: Hashable, msg: Message) -> None:
        role = msg["role"]
        if role not in ("worker", "server"):
            self._send(ident, "error", msg=f"cannot register role {role!r}")
            return
        want = self.env.num_workers if role == "worker" else self.env.num_servers
        have = [n for n in self.nodes.values() if n.role == role]
        if self.started or len(have) >= want or ident in self.nodes:
            self._send(ident, "error", msg=f"the job already has its {want} {role}s (DMLC_NUM_"
                                           f"{'WORKER' if role == 'worker' else 'SERVER'}={want})")
            return
        addr = msg["addr"]
        if role == "server":
            problem = self._unreachable(addr)
            if problem:
                log.error("refused server %s (%s): %s", addr, msg["host"], problem)
                self._send(ident, "error", msg=problem)
                return
        self.nodes[ident] = Node(role, ident, msg.get("rank"), addr=addr, host=msg["host"])
        log.debug("registered a %s (%s%s); %d of %d workers and %d of %d servers so far", role, msg["host"],
                  f", at {addr}" if addr else "", len(self._workers()), self.env.num_workers, len(self._servers()),
                  self.env.num_servers)
        if len(self._workers()) == self.env.num_workers and len(self._servers()) == self.env.num_servers:
            self._start()

    def _unreachable(self, addr: str) -> str | None:
        """Why other hosts could not reach a server at ``addr``, or None."""
        host = urlsplit(addr).hostname or ""
        if not host:
            return f"a server must announce an address to connect to; got {addr!r}"
        if host in ("0.0.0.0", "::"):
            return (f"the server announced {addr}, which is no address to connect to: set DMLC_NODE_HOST (or "
                    "DMLC_INTERFACE) on that host")
        if is_loopback(host) and not self.env.loopback:
            return (f"the server announced the loopback address {addr}, which the other hosts of this job cannot "
                    f"reach (the scheduler is at {self.addr}): set DMLC_INTERFACE to the network interface to use "
                    "(or DMLC_NODE_HOST to the address) on that host")
        return None

    def _start(self) -> None:
        self._assign(self._workers(), self.env.num_workers)
        self._assign(self._servers(), self.env.num_servers)
        servers = [n.addr for n in self._servers()]
        now = time.monotonic()
        for n in self.nodes.values():
            n.last_seen = now
            self._send(n.ident, "welcome", rank=n.rank, servers=servers, pid=os.getpid(),
                       num_workers=self.env.num_workers, num_servers=self.env.num_servers)
        self.started = True
        log.info("all %d servers and %d workers registered; servers at %s", self.env.num_servers,
                 self.env.num_workers, servers)

    def _heartbeat(self, ident: Hashable, msg: Message) -> None:
        node = self.nodes.get(ident) or self.by_hb.get(ident)
        if node is None:  # a worker's heartbeat endpoint introduces itself with role and rank
            node = next((n for n in self.nodes.values() if n.role == msg.get("role") and n.rank == msg.get("rank")
                         and n.hb_ident is None), None)
            if node is None:
                return
            node.hb_ident = ident
            self.by_hb[ident] = node
            log.debug("heartbeats of %s come on their own connection", node.name())
            for w in self._workers():  # workers that closed before this heartbeat endpoint introduced itself
                if w.closed and node.role == "worker":
                    self._send(ident, "closed", rank=w.rank, name=w.name())
        node.last_seen = time.monotonic()
        self._send(ident, "hb")

    def _barrier(self, ident: Hashable, msg: Message) -> None:
        node = self.nodes.get(ident)
        if node is None or node.role != "worker":
            self._send(ident, "error", id=msg["id"], msg="only registered workers take part in barriers")
            return
        gone = [n for n in self._workers() if n.closed]
        if gone:
            self._send(ident, "error", id=msg["id"], msg=self._gone_msg(gone))
            return
        self.barrier_waiting.append((ident, msg["id"]))
        log.debug("barrier: %s waits (%d of %d workers)", node.name(), len(self.barrier_waiting),
                  self.env.num_workers)
        if len(self.barrier_waiting) == self.env.num_workers:
            for who, rid in self.barrier_waiting:
                self._send(who, "barrier_done", id=rid)
            self.barrier_waiting = []
            log.debug("barrier: every worker came; released")

    @staticmethod
    def _gone_msg(gone: list[Node]) -> str:
        names = ", ".join(n.name() for n in gone)
        return (f"barrier can never complete: {names} already closed its store (finished early); every worker "
                "must reach the same barriers")

    def _bye(self, ident: Hashable, msg: Message) -> None:
        node = self.nodes.get(ident)
        if node is None:
            return
        node.closed = True
        if node.role == "server":
            log.debug("server %d said goodbye", node.rank)
            return
        self._send(ident, "bye", id=msg["id"])
        log.info("worker %d closed", node.rank)
        for w in self._workers():  # a sync round waiting for this worker's push can never complete
            if not w.closed and w.hb_ident is not None:
                self._send(w.hb_ident, "closed", rank=node.rank, name=node.name())
        if self.barrier_waiting:
            text = self._gone_msg([node])
            for who, rid in self.barrier_waiting:
                self._send(who, "error", id=rid, msg=text)
            self.barrier_waiting = []
        if all(w.closed for w in self._workers()):
            log.debug("every worker closed; stopping the %d servers", len(self._servers()))
            for s in self._servers():
                self._send(s.ident, "stop")
            self.stopping_since = time.monotonic()

    def _declare_dead(self, node: Node, reason: str) -> None:
        text = f"{node.name()} stopped: {reason}"
        log.error("%s; telling every other node and stopping", text)
        notice = {"role": node.role, "rank": node.rank, "addr": node.addr or node.host, "msg": text}
        for n in self.nodes.values():
            if n is node or n.closed:
                continue
            self._send(n.hb_ident or n.ident, "dead", **notice)
            if n.hb_ident is not None:
                self._send(n.ident, "dead", **notice)
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
        log.info("scheduler listening at %s for %d servers and %d workers (transport %s)", self.addr,
                 self.env.num_servers, self.env.num_workers, self.env.transport)
        begin = time.monotonic()
        tick = min(0.25, self.env.heartbeat_interval)
        try:
            while self.exit_code is None:
                got = self.ep.recv(tick)
                while got is not None:
                    self._dispatch(*got)
                    got = self.ep.recv(0)
                if not self.started:
                    if time.monotonic() - begin > self.env.connect_timeout:
                        nw, ns = len(self._workers()), len(self._servers())
                        text = (f"only {nw} of {self.env.num_workers} workers and {ns} of {self.env.num_servers} "
                                f"servers registered at the scheduler {self.addr} within KVFRAME_CONNECT_TIMEOUT="
                                f"{self.env.connect_timeout:g} s")
                        log.error(text)
                        for n in self.nodes.values():
                            self._send(n.ident, "error", msg=text)
                        self.exit_code = 1
                    continue
                if self.stopping_since is not None:
                    servers_done = all(s.closed for s in self._servers())
                    if servers_done or time.monotonic() - self.stopping_since > 5:
                        self.exit_code = 0
                        break
                self._check_liveness()
        finally:
            log.debug("scheduler: shutting down (exit status %s)", self.exit_code)
            time.sleep(0.2)  # let the last notices leave
            self.ep.close()
        return self.exit_code or 0

    def _dispatch(self, ident: Hashable, msg: Message) -> None:
        node = self.nodes.get(ident)
        if node is not None:
            node.last_seen = time.monotonic()
        handler = {"register": self._register, "hb": self._heartbeat, "barrier": self._barrier,
                   "bye": self._bye}.get(msg.op)
        if handler is None:
            log.warning("dropped a %r message from %s: the scheduler does not take it", msg.op, self.ep.name(ident))
            return
        handler(ident, msg)


def main(argv: list[str] | None = None) -> int:
    def start(env: NodeEnv) -> int:
        try:
            scheduler = Scheduler(env)
        except (TransportError, OSError) as exc:
            log.error("scheduler: cannot listen at %s:%s: %s", env.root_uri, env.root_port, exc)
            return 1
        return scheduler.run()

    return run_role("scheduler", start)


if __name__ == "__main__":
    sys.exit(main())
