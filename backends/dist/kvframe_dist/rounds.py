"""The server's round table: which pushes a key shard holds, and which replies wait for its round.

Sync mode: a shard's pushes are collected until ``num_workers`` have come (a second push from one
worker counts, as in MXNet); then ``complete(slot)`` applies them. A reply to a worker whose push
is in an open round (a pull, pushpull or row_sparse_pull after its push) waits for that round, so
it sees the round's result. Async mode completes every push at once. Nothing here knows messages
or arrays beyond holding them: it is tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Slot:
    """One key shard on a server."""

    key: Any  # the user's key (int or str), given to the optimizer
    data: Any  # the stored value
    pending: list = field(default_factory=list)  # this round's pushed values
    pushers: list = field(default_factory=list)  # who pushed them (sync mode)
    waiting: list = field(default_factory=list)  # replies waiting for this round
    scratch: dict = field(default_factory=dict)  # what the server keeps per slot (merge buffer, pull mirrors)


class Waiter:
    __slots__ = ("left", "respond")

    def __init__(self, left: int, respond: Callable[[], None]):
        self.left, self.respond = left, respond


class RoundTable:
    def __init__(self, num_workers: int, complete: Callable[[Slot], None]):
        self.num_workers = num_workers
        self.complete = complete

    def push(self, slot: Slot, who: Hashable, value: Any, sync: bool) -> None:
        slot.pending.append(value)
        if sync:
            slot.pushers.append(who)
        if len(slot.pending) >= (self.num_workers if sync else 1):
            self._finish(slot)

    def _finish(self, slot: Slot) -> None:
        try:
            self.complete(slot)
        finally:  # a failed update still closes the round: waiting replies must not wait forever
            slot.pending, slot.pushers = [], []
            waiters, slot.waiting = slot.waiting, []
            for w in waiters:
                w.left -= 1
                if w.left == 0:
                    w.respond()

    def after_round(self, who: Hashable, slots: Sequence[Slot], respond: Callable[[], None]) -> None:
        """``respond()`` now, or once every open round that ``who`` pushed into has completed."""
        open_rounds = [s for s in slots if who in s.pushers]
        if not open_rounds:
            respond()
            return
        waiter = Waiter(len(open_rounds), respond)
        for s in open_rounds:
            s.waiting.append(waiter)
