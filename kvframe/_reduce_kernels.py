"""Compiled (numba) sums for :class:`kvframe.reduce.Reducer`: the sum of N arrays in one pass.

``out = ((v0 + v1) + v2) + v3`` element by element reads each input once and writes ``out`` once,
with no intermediate ``out`` traffic and no per-block Python calls.  The additions happen in the
same order and dtype as the numpy path's ``np.add`` chain, so the sums are bit-identical.  More
than four inputs are added a chunk (L1-sized) at a time, up to three more per pass over the chunk.

Importing this module imports numba: kvframe.reduce does it lazily, only when the compiled path is
chosen (``KVFRAME_KERNELS``); kvframe does not require numba.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")

CHUNK = 4096  # elements per chunk when more than four inputs are summed
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@_jit
def _set2(o, a, b):
    for i in range(o.shape[0]):
        o[i] = a[i] + b[i]


@_jit
def _set3(o, a, b, c):
    for i in range(o.shape[0]):
        o[i] = (a[i] + b[i]) + c[i]


@_jit
def _set4(o, a, b, c, d):
    for i in range(o.shape[0]):
        o[i] = ((a[i] + b[i]) + c[i]) + d[i]


@_jit
def _add1(o, a):
    for i in range(o.shape[0]):
        o[i] = o[i] + a[i]


@_jit
def _add2(o, a, b):
    for i in range(o.shape[0]):
        o[i] = (o[i] + a[i]) + b[i]


@_jit
def _add3(o, a, b, c):
    for i in range(o.shape[0]):
        o[i] = ((o[i] + a[i]) + b[i]) + c[i]


@_jit
def _add_rest(o, vals, k, s, e):
    """o += vals[k] + vals[k+1] + ... (left to right) over [s, e)."""
    n = len(vals)
    while k < n:
        left = n - k
        if left >= 3:
            _add3(o, vals[k][s:e], vals[k + 1][s:e], vals[k + 2][s:e])
            k += 3
        elif left == 2:
            _add2(o, vals[k][s:e], vals[k + 1][s:e])
            k += 2
        else:
            _add1(o, vals[k][s:e])
            k += 1


@_jit
def _set_first(o, vals, k, s, e):
    """o = vals[k] + ... + vals[k+3] (as many as there are, up to four) over [s, e); returns how
    many were summed.  (k is a run-time index: a tuple shorter than four still compiles.)"""
    left = len(vals) - k
    if left >= 4:
        _set4(o, vals[k][s:e], vals[k + 1][s:e], vals[k + 2][s:e], vals[k + 3][s:e])
        return 4
    if left == 3:
        _set3(o, vals[k][s:e], vals[k + 1][s:e], vals[k + 2][s:e])
        return 3
    _set2(o, vals[k][s:e], vals[k + 1][s:e])
    return 2


@_jit
def reduce_into(out, vals, accumulate, start, lo, hi):
    """``out[lo:hi] = sum(vals)[lo:hi]`` (or ``+=`` when accumulate), left to right.  ``vals`` is a
    tuple of arrays as long as ``out``; ``start`` is 0 (a run-time index)."""
    n = len(vals)
    if (n <= 4 and not accumulate) or (n <= 3 and accumulate):  # one pass over the whole range
        o = out[lo:hi]
        if accumulate:
            _add_rest(o, vals, start, lo, hi)
        else:
            _set_first(o, vals, start, lo, hi)
        return
    for s in range(lo, hi, CHUNK):  # more inputs: a chunk at a time, so out stays in cache
        e = min(s + CHUNK, hi)
        o = out[s:e]
        k = start
        if not accumulate:
            k += _set_first(o, vals, k, s, e)
        _add_rest(o, vals, k, s, e)


@_jit
def sum2(o, a, b, lo, hi):
    _set2(o[lo:hi], a[lo:hi], b[lo:hi])


@_jit
def sum3(o, a, b, c, lo, hi):
    _set3(o[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi])


@_jit
def sum4(o, a, b, c, d, lo, hi):
    _set4(o[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi], d[lo:hi])


@_jit
def acc1(o, a, lo, hi):
    _add1(o[lo:hi], a[lo:hi])


@_jit
def acc2(o, a, b, lo, hi):
    _add2(o[lo:hi], a[lo:hi], b[lo:hi])


@_jit
def acc3(o, a, b, c, lo, hi):
    _add3(o[lo:hi], a[lo:hi], b[lo:hi], c[lo:hi])


SUM: dict[int, Any] = {2: sum2, 3: sum3, 4: sum4}
ACC: dict[int, Any] = {1: acc1, 2: acc2, 3: acc3}


def _readonly(x: np.ndarray) -> np.ndarray:
    v = x.view()
    v.flags.writeable = False
    return v


def prepare(out: Any, values: Sequence[Any], accumulate: bool) -> Callable[[int, int], None] | None:
    """``call(lo, hi)`` summing flat ``values`` into flat ``out`` (``+=`` when accumulate), or None
    where the compiled sum does not apply (other dtypes, strided or unaligned arrays): the numpy path
    runs then.  As for the numpy path, ``out`` may be one of ``values`` only as ``values[0]`` (then
    the sum is ``out += values[1] + ...``, the same additions)."""
    dt = out.dtype
    if dt not in DTYPES or type(out) is not np.ndarray:
        return None
    fl = out.flags
    if not (fl.c_contiguous and fl.aligned and fl.writeable) or out.ndim != 1:
        return None
    n = out.size
    for v in values:
        if type(v) is not np.ndarray or (v.dtype is not dt and v.dtype != dt) or v.ndim != 1 or v.size != n:
            return None
        fl = v.flags
        if not (fl.c_contiguous and fl.aligned):
            return None
    vals = list(values)
    if not accumulate and np.may_share_memory(vals[0], out):
        accumulate, vals = True, vals[1:]
    k = len(vals)
    if accumulate:
        if k == 0:
            return lambda lo, hi: None
        fn = ACC.get(k)
    else:
        if k < 2:
            return None
        fn = SUM.get(k)
    if fn is not None:
        return lambda lo, hi: fn(out, *vals, lo, hi)
    if len({v.flags.writeable for v in vals}) > 1:  # one array type in the tuple: read-only views
        vals = [_readonly(v) for v in vals]
    tup = tuple(vals)
    return lambda lo, hi: reduce_into(out, tup, accumulate, 0, lo, hi)
