"""Request tracking on a worker: ids, the requests in flight, their answers, and waits that end.

Every request to a server gets an id; its answer (``data``, ``ok`` or ``error``) finds it by that
id. Pushes are not answered one by one: they are remembered as unconfirmed, an error reply to
one is kept and raised at the next wait, and a ``ping`` behind them (answered in order) confirms
them all. Every wait has a deadline and a message naming what it waited for and who did not answer.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from kvframe.errors import KVTimeoutError, RemoteError
from kvframe_dist.wire import Message


class Request:
    __slots__ = ("rid", "server", "what", "on_data", "done", "error", "result")

    def __init__(self, rid: int, server: int, what: str, on_data: Callable[[Message], None] | None):
        self.rid, self.server, self.what, self.on_data = rid, server, what, on_data
        self.done = False
        self.error: str | None = None
        self.result: Message | None = None


class Requests:
    def __init__(self, owner: str):
        self.owner = owner  # "worker 1"
        self._ids = itertools.count(1)
        self.pending: dict[int, Request] = {}
        self.unconfirmed: dict[int, tuple[int, str]] = {}  # push id -> (server, what)
        self.late_errors: list[str] = []

    def next_id(self) -> int:
        return next(self._ids)

    def new(self, server: int, what: str, on_data: Callable[[Message], None] | None = None) -> Request:
        req = Request(self.next_id(), server, what, on_data)
        self.pending[req.rid] = req
        return req

    def push_sent(self, server: int, what: str) -> int:
        """An id for a push that nobody waits for."""
        rid = self.next_id()
        self.unconfirmed[rid] = (server, what)
        return rid

    def answer(self, server: int, msg: Message, where: str) -> None:
        """Route a server's reply to its request (a late or unknown answer is ignored)."""
        rid = msg.get("id")
        req = self.pending.pop(rid, None) if rid is not None else None
        if req is None:
            if msg.op == "error" and rid in self.unconfirmed:
                self.late_errors.append(f"{self.unconfirmed.pop(rid)[1]} failed: {msg['msg']}")
            return
        if req.server != server:  # only the asked server may answer
            self.pending[rid] = req
            return
        if msg.op == "error":
            req.error = msg["msg"]
        elif req.on_data is not None:
            try:
                req.on_data(msg)
            except Exception as exc:  # a reply that does not fit what was asked
                req.error = f"bad reply from {where}: {type(exc).__name__}: {exc}"
        else:
            req.result = msg
        req.done = True

    def raise_late_errors(self) -> None:
        if self.late_errors:
            errs, self.late_errors = self.late_errors, []
            raise RemoteError(f"{self.owner}: " + "; ".join(errs))

    def wait(self, reqs: list[Request], what: str, limit: float, pump: Callable[[float], None],
             check: Callable[[float], None], where: Callable[[int], str], hint: str = "") -> None:
        """Until every request is answered: ``pump(seconds)`` handles incoming messages, ``check(waited)``
        raises when the job failed. Raises KVTimeoutError after ``limit`` seconds, RemoteError for an
        error answer; requests given up on are forgotten (their late answers ignored)."""
        start = time.monotonic()
        deadline = start + limit
        try:
            while not all(r.done for r in reqs):
                now = time.monotonic()
                check(now - start)
                if now >= deadline:
                    missing = sorted({r.server for r in reqs if not r.done})
                    raise KVTimeoutError(f"{self.owner}: timed out after {limit:g} s waiting for "
                                         f"{', '.join(where(s) for s in missing)} to answer {what}{hint}")
                pump(min(deadline - now, 0.1))
        except BaseException:
            for r in reqs:
                self.pending.pop(r.rid, None)
            raise
        errors = [r.error for r in reqs if r.error]
        if errors:
            self.late_errors = []
            raise RemoteError(f"{self.owner}: {what} failed: " + "; ".join(dict.fromkeys(errors)))
        self.raise_late_errors()  # an earlier push that failed shows at the next wait

    def forget_confirmed(self) -> None:
        self.unconfirmed.clear()

    def servers_with_unconfirmed(self) -> list[int]:
        return sorted({s for s, _ in self.unconfirmed.values()})

    def all_pending(self) -> list[Any]:
        return list(self.pending.values())
