"""Sum-only keys: keys whose pushes are summed and stored, never handed to the optimizer.

A store that runs an optimizer (``set_optimizer``, ``set_updater``) treats every push as a
gradient: ``updater(key, merged, stored)``. Some values must only be summed across workers even
then: a metric to average, the gradients of a worker-side optimizer, a broadcast made of sums.
String keys that start with :data:`SUM_PREFIX` are such keys, in every store type:

    kv.set_optimizer("sgd", learning_rate=0.1)
    key = kvframe.sum_key("loss")                 # '__sum__/loss'
    kv.init(key, np.zeros(1, np.float32))
    kv.pushpull(key, np.array([0.25], np.float32), out=total)   # total = the workers' sum

The rule lives here once: single-process stores get it through :class:`SumOnlyUpdater`, which the
``KVStore`` front wraps around every updater it installs; the dist servers apply the same test
(:func:`is_sum_key`) on the key of a completed round. A sum-only key behaves exactly as any key of
a store without an optimizer: a push (a round, in dist_sync) stores the sum. Gradient compression,
when set, still applies to it (as to every push); asynchronous stores have no rounds, so there a
push to a sum-only key stores that push.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

SUM_PREFIX = "__sum__/"


def sum_key(name: str) -> str:
    """The sum-only key for ``name`` (``'__sum__/' + name``; given a sum-only key, that key)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a sum-only key is made from a non-empty str name; got {name!r}")
    return name if name.startswith(SUM_PREFIX) else SUM_PREFIX + name


def is_sum_key(key: Hashable) -> bool:
    """Whether ``key`` is summed only, never given to the optimizer."""
    return isinstance(key, str) and key.startswith(SUM_PREFIX)


def store_sum(merged: Any, stored: Any) -> None:
    """What a store without an optimizer does with a round's sum: it becomes the stored value."""
    from kvframe.arrays import RowSparseArray

    if isinstance(merged, RowSparseArray):
        stored[...] = 0
        stored[merged.indices] = merged.data
    elif merged is not stored:
        stored[...] = merged


class SumOnlyUpdater:
    """Runs ``updater`` on every key except the sum-only ones, whose merged value is stored.

    Every other attribute (``get_states``, ``set_states``, an optimizer's fields) is the wrapped
    updater's, so saving and loading optimizer states work as before.
    """

    def __init__(self, updater: Any):
        self.updater = updater

    def __call__(self, key: Hashable, grad: Any, weight: Any) -> None:
        if is_sum_key(key):
            store_sum(grad, weight)
        else:
            self.updater(key, grad, weight)

    def __getattr__(self, name: str) -> Any:
        if name == "updater":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.updater, name)

    def __repr__(self) -> str:
        return f"SumOnlyUpdater({self.updater!r})"


def sum_only_updater(updater: Any) -> Any:
    """``updater`` wrapped by :class:`SumOnlyUpdater` (once)."""
    return updater if isinstance(updater, SumOnlyUpdater) else SumOnlyUpdater(updater)


class SumOnlyOptimizer:
    """An optimizer whose updaters skip sum-only keys. Its ``config`` is the wrapped optimizer's,
    so stores that send the config elsewhere (the dist servers) send the same thing."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    @property
    def config(self) -> Any:
        return self.optimizer.config

    def create_updater(self) -> Any:
        return sum_only_updater(self.optimizer.create_updater())

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"SumOnlyOptimizer({self.optimizer!r})"


__all__ = ["SUM_PREFIX", "sum_key", "is_sum_key", "store_sum", "SumOnlyUpdater", "SumOnlyOptimizer",
           "sum_only_updater"]
