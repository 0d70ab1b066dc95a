"""The one thread pool that every store, codec and optimizer splits large arrays over.

numpy (and kernels compiled with ``nogil``) release the GIL, so threads working on contiguous
ranges of an array share the memory bandwidth.  One pool serves everything, so a store that
reduces, encodes and updates never runs three pools' worth of threads against two cores.  Work
submitted from a pool thread runs inline: a nested split cannot deadlock the pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_PREFIX = "kvframe-worker"
_MAX_WORKERS = 256  # threads are started lazily; calls say how many parts they want
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def default_threads() -> int:
    """``KVFRAME_THREADS``, else min(4, CPUs)."""
    env = os.environ.get("KVFRAME_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"KVFRAME_THREADS must be a whole number, got {env!r}") from None
    return max(1, min(4, os.cpu_count() or 1))


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(_MAX_WORKERS, thread_name_prefix=_PREFIX)
    return _pool


def split(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous ranges covering [0, n), each starting on a multiple of ``unit``."""
    units = -(-n // unit)
    parts = max(1, min(parts, units))
    bounds = [min(n, (units * i // parts) * unit) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]] or [(0, n)]


def in_pool() -> bool:
    return threading.current_thread().name.startswith(_PREFIX)


def run_ranges(fn: Callable[[int, int], T], n: int, parts: int | None = None, unit: int = 1) -> list[T]:
    """``fn(lo, hi)`` over ``parts`` (default: :func:`default_threads`) unit-aligned ranges of
    [0, n), the first on the calling thread; the results in range order.  Every range finishes
    before this returns, also when one raises (the first error is raised)."""
    parts = default_threads() if parts is None else parts
    if parts <= 1 or n <= unit or in_pool():
        return [fn(0, n)]
    ranges = split(n, parts, unit)
    futures = [pool().submit(fn, lo, hi) for lo, hi in ranges[1:]]
    try:
        first = fn(*ranges[0])
    finally:
        results = []
        error: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:  # wait for every range before raising
                error = error or exc
    if error is not None:
        raise error
    return [first, *results]
