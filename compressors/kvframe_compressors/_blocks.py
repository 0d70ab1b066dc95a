"""Cache blocking, per-thread scratch buffers and the thread pool shared by the CPU codecs.

A codec walks its arrays in blocks of ``BLOCK`` elements so every temporary stays in cache, and
splits large arrays into contiguous, block-aligned ranges run on kvframe's shared thread pool
(numpy releases the GIL inside ufuncs, so the threads share the memory bandwidth).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np

from kvframe import parallel

BLOCK = 1 << 17  # elements per block (measured best here): a multiple of every packing unit (16, 32)
PARALLEL_MIN = 1 << 19  # arrays smaller than this are encoded on the calling thread



def n_threads() -> int:
    env = os.environ.get("KVFRAME_COMPRESSION_THREADS")
    if env:
        return max(1, int(env))
    return parallel.default_threads()


def run_ranges(fn: Callable[[int, int], None], n: int) -> None:
    """Call ``fn(lo, hi)`` over block-aligned ranges of [0, n), in parallel for large ``n``."""
    if n < PARALLEL_MIN:
        fn(0, n)
    else:
        parallel.run_ranges(fn, n, n_threads(), BLOCK)


def decode_through(out: np.ndarray, accumulate: bool, work: Callable[[np.ndarray, int, int], None]) -> np.ndarray:
    """Run a decoder over ``out``: ``work(flat, lo, hi)`` writes (adds, with ``accumulate``)
    elements [lo, hi) of a flat, writeable, C-contiguous array.  That array is ``out`` itself where
    it can be, else a temporary (holding ``out``'s values when accumulating) copied back after."""
    target = out if out.flags.c_contiguous and out.flags.writeable else np.empty(out.shape, out.dtype)
    if accumulate and target is not out:
        target[...] = out
    flat = target.reshape(-1)
    run_ranges(lambda lo, hi: work(flat, lo, hi), flat.size)
    if target is not out:
        out[...] = target
    return out


class Block:
    """Fixed temporaries for one cache block (one set per thread)."""

    def __init__(self) -> None:
        size = BLOCK + 64
        self.pos = np.empty(size, np.bool_)
        self.neg = np.empty(size, np.bool_)
        self.q = np.empty(size, np.int8)
        self.d = np.empty(size, np.float32)
        self.dec = np.empty(size, np.float32)
        self.words = np.empty(size // 4, np.uint32)


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.bufs: dict = {}
        self._block: Block | None = None

    def block(self) -> Block:
        b = self._block
        if b is None:
            b = self._block = Block()
        return b

    def get(self, name: str, shape: int | tuple, dtype) -> np.ndarray:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != np.dtype(dtype):
            buf = self.bufs[name] = np.empty((max(shape[0], BLOCK),) + shape[1:], dtype)
        return buf[: shape[0]]


scratch = _Scratch()


def flat_input(x: np.ndarray) -> np.ndarray:
    """A 1-D C-contiguous view of ``x`` (a copy only when ``x`` is not contiguous)."""
    return x.reshape(-1) if x.flags.c_contiguous else np.ascontiguousarray(x).reshape(-1)


def flat_inplace(x: np.ndarray, what: str) -> np.ndarray:
    """A 1-D view of ``x`` that writes through; refuses arrays that cannot give one."""
    if not x.flags.c_contiguous or not x.flags.writeable:
        raise ValueError(f"the {what} must be a writeable C-contiguous array (it is updated in place); got "
                         f"strides {x.strides} for shape {x.shape}")
    return x.reshape(-1)
