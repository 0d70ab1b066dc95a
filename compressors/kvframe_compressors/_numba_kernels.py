"""numba kernels for the '2bit' and '1bit' codecs (imported only through :mod:`._kernels`).

Every kernel takes 1-D C-contiguous float32 arrays and float32 scalars and does, value by value,
exactly the float32 operations of the numpy path in :mod:`.quantize`, in the same order:

* 2bit: ``x = r + g``; ``d = v`` if ``x >= t``, ``-v`` if ``x <= -t``, else ``+0.0``;
  ``r = x - d`` (the numpy path subtracts ``(+1 | -1 | 0) * v``, the same values); decoding writes
  the code's value (``+t``, ``-t`` or ``+0.0``), or adds it (``out + 0.0`` too: -0.0 becomes +0.0,
  as in numpy).
* 1bit: ``x = r + g``; bit ``x > t``; ``r = x + (-1 | +1)``; decodes to ``+1`` / ``-1``.

No fastmath and no multiplications, so LLVM may vectorise the loops but cannot change a result.
Compiled lazily per signature on first use and cached on disk (``cache=True``); ``nogil=True`` so
the shared thread pool runs them in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_MINUS_ONE = np.float32(-1.0)


@njit(nogil=True, cache=True)
def encode_2bit(g, r, out, t, v, use_g):  # pragma: no cover - compiled
    """Fold ``g`` into ``r`` (or take ``r`` as it is when not ``use_g``) and write the codes for
    threshold ``t`` into ``out[:ceil(n / 4)]``; a value sent takes ``+-v`` off the residual."""
    n = r.size
    neg_t = -t
    neg_v = -v
    full = n >> 2
    for b in range(full):
        c = 0
        i = b << 2
        for j in range(4):
            x = r[i + j] + g[i + j] if use_g else r[i + j]
            pos = x >= t
            neg = x <= neg_t
            d = v if pos else (neg_v if neg else _ZERO)
            r[i + j] = x - d
            c = (c << 2) | (3 if pos else (2 if neg else 0))
        out[b] = c
    rest = n - (full << 2)
    if rest:
        c = 0
        i = full << 2
        for j in range(4):
            code = 0
            if j < rest:
                x = r[i + j] + g[i + j] if use_g else r[i + j]
                pos = x >= t
                neg = x <= neg_t
                d = v if pos else (neg_v if neg else _ZERO)
                r[i + j] = x - d
                code = 3 if pos else (2 if neg else 0)
            c = (c << 2) | code
        out[full] = c


@njit(nogil=True, cache=True)
def decode_2bit(p, out, t, accumulate):  # pragma: no cover - compiled
    """Write (or add) the values of the codes ``p`` for threshold ``t`` into ``out``."""
    n = out.size
    neg_t = -t
    full = n >> 2
    if accumulate:
        for b in range(full):
            c = np.int32(p[b])
            i = b << 2
            for j in range(4):
                code = (c >> (6 - 2 * j)) & 3
                out[i + j] = out[i + j] + (t if code == 3 else (neg_t if code == 2 else _ZERO))
    else:
        for b in range(full):
            c = np.int32(p[b])
            i = b << 2
            for j in range(4):
                code = (c >> (6 - 2 * j)) & 3
                out[i + j] = t if code == 3 else (neg_t if code == 2 else _ZERO)
    i = full << 2
    if i < n:
        c = np.int32(p[full])
        for j in range(n - i):
            code = (c >> (6 - 2 * j)) & 3
            d = t if code == 3 else (neg_t if code == 2 else _ZERO)
            out[i + j] = out[i + j] + d if accumulate else d


@njit(nogil=True, cache=True)
def encode_decode_2bit(g, r, out, t, accumulate):  # pragma: no cover - compiled
    """``out (+)= decode(encode(g, r))`` for threshold ``t``, the residual updated, in one pass."""
    n = r.size
    neg_t = -t
    if accumulate:
        for i in range(n):
            x = r[i] + g[i]
            d = t if x >= t else (neg_t if x <= neg_t else _ZERO)
            r[i] = x - d
            out[i] = out[i] + d
    else:
        for i in range(n):
            x = r[i] + g[i]
            d = t if x >= t else (neg_t if x <= neg_t else _ZERO)
            r[i] = x - d
            out[i] = d


@njit(nogil=True, cache=True)
def encode_1bit(g, r, out, t):  # pragma: no cover - compiled
    """Fold ``g`` into ``r`` and write the bits (``r > t``, most significant first) into
    ``out[:ceil(n / 8)]``; each value takes one step of -1 (bit 1) or +1 (bit 0)."""
    n = r.size
    full = n >> 3
    for b in range(full):
        c = 0
        i = b << 3
        for j in range(8):
            x = r[i + j] + g[i + j]
            bit = x > t
            r[i + j] = x + (_MINUS_ONE if bit else _ONE)
            c = (c << 1) | (1 if bit else 0)
        out[b] = c
    rest = n - (full << 3)
    if rest:
        c = 0
        i = full << 3
        for j in range(8):
            bit = False
            if j < rest:
                x = r[i + j] + g[i + j]
                bit = x > t
                r[i + j] = x + (_MINUS_ONE if bit else _ONE)
            c = (c << 1) | (1 if bit else 0)
        out[full] = c


@njit(nogil=True, cache=True)
def decode_1bit(p, out, accumulate):  # pragma: no cover - compiled
    """Write (or add) +1 / -1 for the bits ``p`` into ``out``."""
    n = out.size
    full = n >> 3
    if accumulate:
        for b in range(full):
            c = np.int32(p[b])
            i = b << 3
            for j in range(8):
                out[i + j] = out[i + j] + (_ONE if (c >> (7 - j)) & 1 else _MINUS_ONE)
    else:
        for b in range(full):
            c = np.int32(p[b])
            i = b << 3
            for j in range(8):
                out[i + j] = _ONE if (c >> (7 - j)) & 1 else _MINUS_ONE
    i = full << 3
    if i < n:
        c = np.int32(p[full])
        for j in range(n - i):
            d = _ONE if (c >> (7 - j)) & 1 else _MINUS_ONE
            out[i + j] = out[i + j] + d if accumulate else d


@njit(nogil=True, cache=True)
def encode_decode_1bit(g, r, out, t, accumulate):  # pragma: no cover - compiled
    """``out (+)= decode(encode(g, r))`` for threshold ``t``, the residual updated, in one pass."""
    n = r.size
    if accumulate:
        for i in range(n):
            x = r[i] + g[i]
            bit = x > t
            r[i] = x + (_MINUS_ONE if bit else _ONE)
            out[i] = out[i] + (_ONE if bit else _MINUS_ONE)
    else:
        for i in range(n):
            x = r[i] + g[i]
            bit = x > t
            r[i] = x + (_MINUS_ONE if bit else _ONE)
            out[i] = _ONE if bit else _MINUS_ONE


@njit(nogil=True, cache=True)
def encode_decode_sum_2bit(gs, rs, out, t, accumulate):  # pragma: no cover - compiled
    """``out (+)= sum over copies c of decode(encode(gs[c], rs[c]))`` in one pass over the values,
    adding in copy order (``out = d0``, then ``out + d1``, ...: the sums of the per-copy calls)."""
    n = out.size
    neg_t = -t
    m = len(gs)  # a compile-time constant: the copy loop unrolls and the value loop vectorises
    for i in range(n):
        x = rs[0][i] + gs[0][i]
        d = t if x >= t else (neg_t if x <= neg_t else _ZERO)
        rs[0][i] = x - d
        o = out[i] + d if accumulate else d
        for c in range(1, m):
            x = rs[c][i] + gs[c][i]
            d = t if x >= t else (neg_t if x <= neg_t else _ZERO)
            rs[c][i] = x - d
            o = o + d
        out[i] = o


@njit(nogil=True, cache=True)
def encode_decode_sum_1bit(gs, rs, out, t, accumulate):  # pragma: no cover - compiled
    """The 1bit form of :func:`encode_decode_sum_2bit`."""
    n = out.size
    m = len(gs)
    for i in range(n):
        x = rs[0][i] + gs[0][i]
        bit = x > t
        rs[0][i] = x + (_MINUS_ONE if bit else _ONE)
        d = _ONE if bit else _MINUS_ONE
        o = out[i] + d if accumulate else d
        for c in range(1, m):
            x = rs[c][i] + gs[c][i]
            bit = x > t
            rs[c][i] = x + (_MINUS_ONE if bit else _ONE)
            o = o + (_ONE if bit else _MINUS_ONE)
        out[i] = o
