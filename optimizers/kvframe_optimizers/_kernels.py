"""Fused, compiled (numba) versions of the element-wise optimizer steps of :mod:`kvframe_optimizers.rules`.

Each step reads and writes every array once per element, in one loop, instead of the numpy kernel's
many passes.  The arithmetic is the numpy kernels', operation for operation, in the weight's dtype
(float32 or float64): scalars are rounded to that dtype as numpy does with a Python float, no
fused multiply-adds, no reassociation (no ``fastmath``), so the weights and states come out bit
for bit as on the numpy path.  Only the sums of squares of lamb's norms differ in the last bits
(accumulated in float64 here, in float32 blocks by BLAS on the numpy path).

Importing this module imports numba: :mod:`kvframe_optimizers.engine` does it lazily, and only
when the compiled path is chosen (``KVFRAME_KERNELS``).  ``prepare(name, p, arrays)`` returns a
``call(lo, hi)`` that runs one range of the step (the engine splits large arrays over the threads of
kvframe's pool: the loops release the GIL), or None where the kernel does not apply (dtypes other
than float32/float64, mixed dtypes, read-only outputs): the engine then runs the numpy kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

# error_model="numpy": x/0 gives inf/nan as numpy does (and loops with divisions vectorize)
_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_jit_sum = numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=True)

CHUNK = 2048  # elements per inner chunk of a kernel that also sums squares (stays in L1)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@_jit
def _clip(x, lo, hi):
    # np.clip: NaN stays NaN
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


@_jit_sum
def _sum_sq(x):
    """Sum of squares in float64 (reassociated: vectorized)."""
    acc = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        acc += v * v
    return acc


# sgd / lars / lbsgd (rules._sgd_kernel) ------------------------------------------------------
@_jit
def sgd(w, g, s, clip, wd, lo, hi):
    """s = [rescale*-lr, rescale, -clip, clip, -lr, 1 - lr*wd]"""
    w, g = w[lo:hi], g[lo:hi]  # from 0: indices provably >= 0, so the loop vectorizes
    scale, rescale, clo, chi, neg_lr, decay = s[0], s[1], s[2], s[3], s[4], s[5]
    for i in range(w.shape[0]):
        if clip:
            G = _clip(g[i] * rescale, clo, chi) * neg_lr
        else:
            G = g[i] * scale
        x = w[i]
        if wd:
            x = x * decay
        w[i] = x + G


@_jit
def sgd_mom(w, g, m, s, clip, wd, lo, hi):
    """s = [rescale*-lr, rescale, -clip, clip, -lr, momentum, -lr*wd]"""
    w, g, m = w[lo:hi], g[lo:hi], m[lo:hi]
    scale, rescale, clo, chi, neg_lr, mom, lrwd = s[0], s[1], s[2], s[3], s[4], s[5], s[6]
    for i in range(w.shape[0]):
        if clip:
            G = _clip(g[i] * rescale, clo, chi) * neg_lr
        else:
            G = g[i] * scale
        x = w[i]
        mi = m[i] * mom + G
        if wd:
            mi = mi + x * lrwd
        m[i] = mi
        w[i] = x + mi


@_jit
def nag_mom(w, g, m, s, clip, wd, lo, hi):
    """s = [rescale, -clip, clip, wd, momentum, lr]"""
    w, g, m = w[lo:hi], g[lo:hi], m[lo:hi]
    rescale, clo, chi, wdv, mom, lr = s[0], s[1], s[2], s[3], s[4], s[5]
    for i in range(w.shape[0]):
        G = g[i] * rescale
        if clip:
            G = _clip(G, clo, chi)
        x = w[i]
        T = x * wdv + G if wd else G
        mi = m[i] * mom
        U = ((mi + T) * mom + T) * lr
        x = x - U
        mi = mi + G
        if wd:
            mi = mi + x * wdv
        m[i] = mi
        w[i] = x


# adam / adamw ----------------------------------------------------------------------------------
@_jit
def adam(w, g, m, v, s, clip, wd, lo, hi):
    """rules.Adam.kernel; s = [rescale, wd, -clip, clip, b1, 1-b1, b2, 1-b2, eps, lr_t]"""
    w, g, m, v = w[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    rescale, wdv, clo, chi, b1, cb1, b2, cb2, eps, lr_t = s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9]
    for i in range(w.shape[0]):
        x = w[i]
        G = g[i] * rescale
        if wd:
            G = G + x * wdv
        if clip:
            G = _clip(G, clo, chi)
        mi = m[i] * b1 + G * cb1
        vi = v[i] * b2 + G * G * cb2
        m[i] = mi
        v[i] = vi
        w[i] = x - mi / (np.sqrt(vi) + eps) * lr_t


@_jit
def adamw(w, g, m, v, s, clip, wd, lo, hi):
    """rules.AdamW.kernel; s = [rescale, wd, -clip, clip, b1, 1-b1, b2, 1-b2, eps, eta]"""
    w, g, m, v = w[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    rescale, wdv, clo, chi, b1, cb1, b2, cb2, eps, eta = s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9]
    for i in range(w.shape[0]):
        x = w[i]
        G = g[i] * rescale
        if clip:
            G = _clip(G, clo, chi)
        mi = m[i] * b1 + G * cb1
        vi = v[i] * b2 + G * G * cb2
        m[i] = mi
        v[i] = vi
        T = mi / (np.sqrt(vi) + eps)
        if wd:
            T = T + x * wdv
        w[i] = x - T * eta


# lamb (and its apply) --------------------------------------------------------------------------
@_jit
def lamb_direction(w, g, m, v, u, s, clip, wd, unbias1, lo, hi):
    """rules.LAMB.kernel: the update direction u and the sums of squares of w and u.
    s = [rescale, -clip, clip, b1, 1-b1, b2, 1-b2, 1/c2, eps, 1/c1, wd]"""
    rescale, clo, chi, b1, cb1, b2, cb2 = s[0], s[1], s[2], s[3], s[4], s[5], s[6]
    ic2, eps, ic1, wdv = s[7], s[8], s[9], s[10]
    ww = 0.0
    uu = 0.0
    for start in range(lo, hi, CHUNK):  # a chunk at a time, so its sums of squares read it from L1
        end = min(start + CHUNK, hi)
        wc, gc, mc, vc, uc = w[start:end], g[start:end], m[start:end], v[start:end], u[start:end]
        for i in range(wc.shape[0]):
            G = gc[i] * rescale
            if clip:
                G = _clip(G, clo, chi)
            mi = mc[i] * b1 + G * cb1
            vi = vc[i] * b2 + G * G * cb2
            mc[i] = mi
            vc[i] = vi
            ui = mi / (np.sqrt(vi * ic2) + eps)
            if unbias1:
                ui = ui * ic1
            if wd:
                ui = ui + wc[i] * wdv
            uc[i] = ui
        ww += _sum_sq(wc)
        uu += _sum_sq(uc)
    return ww, uu


@_jit
def axpy(w, u, s, lo, hi):
    """w += u * s[0] (rules._axpy_kernel, without writing u back)"""
    w, u = w[lo:hi], u[lo:hi]
    a = s[0]
    for i in range(w.shape[0]):
        w[i] = w[i] + u[i] * a


# what the engine calls ---------------------------------------------------------------------------
def _scalars(dtype: np.dtype, *values: float) -> np.ndarray:
    """The step's scalars rounded to the arrays' dtype, as numpy rounds a Python float operand."""
    return np.array(values, dtype=dtype)


def _clip_bounds(p: Any) -> tuple[bool, float, float]:
    return (False, 0.0, 0.0) if p.clip is None else (True, -p.clip, p.clip)


def _prep_sgd(p, a, dt):
    clip, clo, chi = _clip_bounds(p)
    w, g = a[0], a[1]
    wd = bool(p.wd)
    if len(a) == 2:
        s = _scalars(dt, p.rescale * -p.lr, p.rescale, clo, chi, -p.lr, 1.0 - p.lr * p.wd)
        return lambda lo, hi: sgd(w, g, s, clip, wd, lo, hi)
    if len(a) != 3:
        return None
    m = a[2]
    s = _scalars(dt, p.rescale * -p.lr, p.rescale, clo, chi, -p.lr, p.momentum, -p.lr * p.wd)
    return lambda lo, hi: sgd_mom(w, g, m, s, clip, wd, lo, hi)


def _prep_nag(p, a, dt):
    if len(a) == 2:
        return _prep_sgd(p, a, dt)
    clip, clo, chi = _clip_bounds(p)
    w, g, m = a
    wd = bool(p.wd)
    s = _scalars(dt, p.rescale, clo, chi, p.wd, p.momentum, p.lr)
    return lambda lo, hi: nag_mom(w, g, m, s, clip, wd, lo, hi)


def _prep_adam(p, a, dt):
    clip, clo, chi = _clip_bounds(p)
    w, g, m, v = a
    wd = bool(p.wd)
    s = _scalars(dt, p.rescale, p.wd, clo, chi, p.b1, 1.0 - p.b1, p.b2, 1.0 - p.b2, p.eps, p.lr_t)
    return lambda lo, hi: adam(w, g, m, v, s, clip, wd, lo, hi)


def _prep_adamw(p, a, dt):
    clip, clo, chi = _clip_bounds(p)
    w, g, m, v = a
    wd = bool(p.wd)
    s = _scalars(dt, p.rescale, p.wd, clo, chi, p.b1, 1.0 - p.b1, p.b2, 1.0 - p.b2, p.eps, p.eta)
    return lambda lo, hi: adamw(w, g, m, v, s, clip, wd, lo, hi)


def _prep_lamb(p, a, dt):
    clip, clo, chi = _clip_bounds(p)
    w, g, m, v, u = a
    wd = bool(p.wd)
    unbias1 = p.c1 != 1.0
    s = _scalars(dt, p.rescale, clo, chi, p.b1, 1.0 - p.b1, p.b2, 1.0 - p.b2, 1.0 / p.c2, p.eps,
                 1.0 / p.c1, p.wd)
    return lambda lo, hi: lamb_direction(w, g, m, v, u, s, clip, wd, unbias1, lo, hi)


def _prep_axpy(p, a, dt):
    w, u = a
    s = _scalars(dt, p.scale)
    return lambda lo, hi: axpy(w, u, s, lo, hi)


PREPARE: dict[str, Callable[[Any, Sequence[np.ndarray], np.dtype], Any]] = {
    "sgd": _prep_sgd,
    "nag": _prep_nag,
    "adam": _prep_adam,
    "adamw": _prep_adamw,
    "lamb": _prep_lamb,
    "axpy": _prep_axpy,
}

def prepare(name: str, p: Any, arrays: Sequence[Any]) -> Callable[[int, int], Any] | None:
    """``call(lo, hi)`` running the compiled ``name`` step on ``arrays[*][lo:hi]``, or None when
    the compiled kernel does not cover these arrays (the numpy kernel runs instead)."""
    w = arrays[0]
    dt = w.dtype
    if dt not in DTYPES:
        return None
    for i, x in enumerate(arrays):
        if type(x) is not np.ndarray or x.dtype != dt or x.ndim != 1 or not x.flags.c_contiguous:
            return None
        if i != 1 and not x.flags.writeable:  # every array but the gradient is written (or is scratch)
            return None
    return PREPARE[name](p, arrays, dt)
