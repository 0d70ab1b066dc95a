"""Running element-wise update kernels fast on numpy, and as one call on cupy.

A kernel is ``kernel(xp, p, arrays, tmps) -> tuple of floats or None``: ``arrays`` are equally
long flat views (weight, gradient, states...), updated in place with ``out=`` ufuncs; ``tmps`` are
scratch buffers as long as the views; ``p`` holds the step's scalars.  A kernel that returns
numbers (partial sums of squares, say) has them added up over the pieces.

On numpy a large array is cut into cache-sized blocks, so the kernel's many small passes run in
the CPU cache and main memory sees each array about once (as a fused kernel would), and the
blocks are shared between the threads of kvframe's pool (numpy releases the GIL inside ufuncs).
On cupy (or anything not numpy) the kernel runs once over the whole arrays.

A kernel marked with :func:`fused` has a compiled, one-pass counterpart in
:mod:`kvframe_optimizers._kernels` (numba, optional).  ``KVFRAME_KERNELS`` picks the path: ``numba``
(the default when numba can be imported) or ``numpy``; :func:`kernel_backend` says which one runs.
The compiled step runs over ranges of the arrays on the same pool (its loops release the GIL); where
it does not apply (cupy arrays, float16, mixed dtypes) the numpy kernel runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvframe import kernels, parallel

BLOCK = int(os.environ.get("KVFRAME_OPTIMIZER_BLOCK", 1 << 16))  # elements per block (256 KiB of float32)
PARALLEL_MIN = 1 << 17  # arrays smaller than this run on the calling thread
Kernel = Callable[[Any, Any, Sequence[Any], Sequence[Any]], Any]
RANGE_UNIT = 1 << 12  # compiled kernels: ranges start on multiples of this many elements
COMPILED = "kvframe_optimizers._kernels"


def kernel_backend() -> str:
    """Which path runs the element-wise steps on numpy arrays: ``'numba'`` or ``'numpy'``
    (``KVFRAME_KERNELS``, see :mod:`kvframe.kernels`)."""
    return kernels.backend(COMPILED)


def fused(name: str) -> Callable[[Kernel], Kernel]:
    """Mark a numpy kernel as having the compiled counterpart ``name`` in ``_kernels.PREPARE``."""

    def mark(kernel: Kernel) -> Kernel:
        kernel.fused = name  # type: ignore[attr-defined]
        return kernel

    return mark


def _threads() -> int:
    env = os.environ.get("KVFRAME_OPTIMIZER_THREADS")
    if env:
        return max(1, int(env))
    return parallel.default_threads()


class Runner:
    def __init__(self, threads: int | None = None, block: int = BLOCK):
        self.threads = threads or _threads()
        self.block = block
        self._local = threading.local()

    def _scratch(self, ntmp: int, dtype: Any, n: int) -> list:
        if ntmp == 0:
            return []
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        key = np.dtype(dtype)
        have = bufs.get(key)
        if not have or len(have) < ntmp or have[0].size < n:
            size = max(n, self.block)
            have = bufs[key] = [np.empty(size, dtype=key) for _ in range(max(ntmp, len(have or ())))]
        return [b[:n] for b in have[:ntmp]]

    def run(self, kernel: Kernel, p: Any, arrays: Sequence[Any], ntmp: int, dtype: Any) -> Any:
        """Run ``kernel`` over flat, equally long ``arrays``; returns the summed results (or None)."""
        first = arrays[0]
        n = first.size
        if type(first) is not np.ndarray:  # cupy: one call over everything
            xp = _xp(first)
            tmps = [xp.empty(n, dtype=dtype) for _ in range(ntmp)]
            return kernel(xp, p, arrays, tmps)
        name = getattr(kernel, "fused", None)
        compiled = kernels.compiled(COMPILED) if name is not None else None
        if compiled is not None:
            call = compiled.prepare(name, p, arrays)
            if call is not None:
                return self._run_compiled(call, n)
        if n <= self.block:
            return kernel(np, p, arrays, self._scratch(ntmp, dtype, n))

        def work(lo: int, hi: int) -> Any:
            total = None
            for s in range(lo, hi, self.block):
                e = min(s + self.block, hi)
                r = kernel(np, p, [a[s:e] for a in arrays], self._scratch(ntmp, dtype, e - s))
                if r is not None:
                    total = list(r) if total is None else [x + y for x, y in zip(total, r)]
            return total

        parts = self.threads if n >= PARALLEL_MIN else 1
        # split on block boundaries so every block but the last is whole
        results = [r for r in parallel.run_ranges(work, n, parts, self.block) if r is not None]
        if not results:
            return None
        return [sum(col) for col in zip(*results)]

    def _run_compiled(self, call: Callable[[int, int], Any], n: int) -> Any:
        parts = self.threads if n >= PARALLEL_MIN else 1
        results = [r for r in parallel.run_ranges(call, n, parts, RANGE_UNIT) if r is not None]
        if not results:
            return None
        return [sum(col) for col in zip(*results)]


def _xp(x: Any):
    from kvframe.arrays import array_module

    return array_module(x)


_runner: Runner | None = None


def runner() -> Runner:
    global _runner
    if _runner is None:
        _runner = Runner()
    return _runner
