"""Summing and copying arrays on the CPU, split over the shared thread pool for large arrays.

Every store reduces with this (local, device, the dist worker and server).

numpy releases the GIL inside ufuncs, so threads share the memory bandwidth.  Each thread walks
its contiguous range in cache-sized blocks so that summing N inputs reads each input once and
writes the output once, with the partial sums kept in cache.

Where numba can be imported, sums of float32/float64 arrays run a compiled one-pass loop instead
(:mod:`kvframe._reduce_kernels`: the same additions in the same order, so the same bits).
``KVFRAME_KERNELS=numpy|numba`` chooses, as for the optimizers and codecs (unset: numba when it
can be imported); :func:`kernel_backend` says which runs.  kvframe does not require numba.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvframe import kernels, parallel
from kvframe.arrays import RowSparseArray, array_module

BLOCK = 1 << 15  # elements per cache block (128 KiB of float32)
COMPILED_MIN = 1 << 12  # smaller sums stay on numpy (the compiled call's fixed cost is larger there)
COMPILED = "kvframe._reduce_kernels"


def kernel_backend() -> str:
    """Which path sums numpy arrays: ``'numba'`` or ``'numpy'`` (``KVFRAME_KERNELS``, see
    :mod:`kvframe.kernels`)."""
    return kernels.backend(COMPILED)


def _compiled_sum(out: Any, values: Sequence[Any], accumulate: bool) -> Callable[[int, int], None] | None:
    mod = kernels.compiled(COMPILED) if out.size >= COMPILED_MIN else None
    return None if mod is None else mod.prepare(out, values, accumulate)


class Reducer:
    """Sums and copies; arrays of at least ``bigarray_bound`` elements are split over ``threads``
    threads of the shared pool (default: :func:`kvframe.parallel.default_threads`)."""

    def __init__(self, threads: int | None = None, bigarray_bound: int = 1_000_000):
        self.threads = max(1, threads or parallel.default_threads())
        self.bigarray_bound = bigarray_bound

    def close(self) -> None:
        """Nothing to release: the pool is shared by the process."""

    def _parallel(self, fn: Callable[[int, int], None], n: int) -> None:
        if self.threads == 1 or n < self.bigarray_bound:
            fn(0, n)
        else:
            parallel.run_ranges(fn, n, self.threads, BLOCK)

    def sum_into(self, out: Any, values: Sequence[Any]) -> Any:
        """out = sum(values), dense arrays of one shape and dtype. ``out`` may be one of ``values``
        only as ``values[0]``."""
        if len(values) == 1:
            return self.copy_into(out, values[0])
        if array_module(out) is not np or not all(v.flags.c_contiguous for v in values) or not out.flags.c_contiguous:
            xp = array_module(out)
            xp.add(values[0], values[1], out=out)
            for v in values[2:]:
                xp.add(out, v, out=out)
            return out
        return self._sum(out, values, accumulate=False)

    def add_into(self, out: Any, values: Sequence[Any]) -> Any:
        """out += sum(values)."""
        if array_module(out) is not np or not out.flags.c_contiguous or not all(v.flags.c_contiguous for v in values):
            for v in values:
                out += v
            return out
        return self._sum(out, values, accumulate=True)

    def _sum(self, out: np.ndarray, values: Sequence[np.ndarray], accumulate: bool) -> np.ndarray:
        """Sum C-contiguous numpy ``values`` into (``accumulate``: onto) ``out``: compiled where it
        can, else numpy adds block by block, the partial sums staying in cache."""
        flat_out = out.reshape(-1)
        flats = [v.reshape(-1) for v in values]
        work = _compiled_sum(flat_out, flats, accumulate)
        if work is None:
            def work(lo: int, hi: int) -> None:
                for s in range(lo, hi, BLOCK):
                    e = min(s + BLOCK, hi)
                    o = flat_out[s:e]
                    rest = flats
                    if not accumulate:  # the first two make the block's value
                        np.add(flats[0][s:e], flats[1][s:e], out=o)
                        rest = flats[2:]
                    for f in rest:
                        np.add(o, f[s:e], out=o)

        self._parallel(work, flat_out.size)
        return out

    def copy_into(self, out: Any, value: Any) -> Any:
        if type(out) is np.ndarray and type(value) is np.ndarray and out.size < self.bigarray_bound:
            np.copyto(out, value)
            return out
        if out is value:
            return out
        if array_module(out) is not np or array_module(value) is not np or out.size < self.bigarray_bound \
                or not (out.flags.c_contiguous and value.flags.c_contiguous):
            xp = array_module(out)
            if xp is np and array_module(value) is not np:
                out[...] = value.get()
            else:
                xp.copyto(out, value) if array_module(value) is xp else out.set(value)
            return out
        flat_out, flat_in = out.reshape(-1), value.reshape(-1)
        self._parallel(lambda lo, hi: np.copyto(flat_out[lo:hi], flat_in[lo:hi]), flat_out.size)
        return out


def sum_row_sparse(values: Sequence[RowSparseArray]) -> RowSparseArray:
    """The sum of row-sparse arrays: the union of their rows."""
    if len(values) == 1:
        return values[0]
    xp = array_module(values[0].data)
    idx = xp.concatenate([v.indices for v in values])
    data = xp.concatenate([v.data for v in values])
    return RowSparseArray.from_rows(data, idx, values[0].shape)


def merge(reducer: Reducer, values: Sequence[Any], buffer: Any | None) -> Any:
    """Sum per-device values into one: dense into ``buffer`` (allocated when None), all-sparse into a
    RowSparseArray; a mix is densified."""
    if all(isinstance(v, RowSparseArray) for v in values):
        return sum_row_sparse(values)
    dense = [v.todense() if isinstance(v, RowSparseArray) else v for v in values]
    if buffer is None:
        buffer = array_module(dense[0]).empty(dense[0].shape, dense[0].dtype)
    return reducer.sum_into(buffer, dense)
