"""Casting compressors: 'fp16' (IEEE half) and 'bf16' (bfloat16, round to nearest even).

With ``error_feedback`` (the default) the rounding error stays in the residual and is sent in a
later step: ``r += g; payload = cast(r); r -= payload``.  Without it the gradient is cast as is
and the residual is left alone.  fp16 saturates: finite values beyond +-65504 (its largest finite
value) are sent as +-65504, and with error feedback the excess waits in the residual.  NaN and inf are sent as they come
but never kept in the residual.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvframe.arrays import array_module
from kvframe_compressors._blocks import BLOCK, flat_inplace, flat_input, run_ranges, scratch
from kvframe_compressors.base import BaseCompressor


def f32_to_bf16_bits(x: Any, out: Any, xp: Any = np, tmp: Any = None) -> Any:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    u = x.view(xp.uint32)
    t = xp.right_shift(u, 16, out=tmp)
    xp.bitwise_and(t, 1, out=t)
    t += 0x7FFF
    t += u
    t >>= 16
    out[...] = t.astype(xp.uint16)
    nan = xp.isnan(x)
    if bool(nan.any()):
        out[nan] = (xp.right_shift(u[nan], 16) | 0x0040).astype(xp.uint16)
    return out


def bf16_bits_to_f32(bits: Any, out: Any, xp: Any = np) -> Any:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    u = out.view(xp.uint32)
    u[...] = bits
    u <<= 16
    return out


def _forget_non_finite(residual: Any, xp: Any) -> None:
    """A NaN or inf gradient is sent once (so an overflow still shows) but never kept: left in the
    residual it would poison every later step, and overflowing steps are routine with loss scaling."""
    bad = ~xp.isfinite(residual)
    if bool(bad.any()):
        residual[bad] = 0


class _Cast(BaseCompressor):
    wire_dtype: Any = np.float16
    block_multiple = 1

    def compressed_nbytes(self, size: int) -> int:
        return int(size) * np.dtype(self.wire_dtype).itemsize

    def _to_wire(self, x: Any, out: Any, xp: Any) -> None:
        raise NotImplementedError

    def _from_wire(self, p: Any, out: Any, xp: Any) -> None:
        raise NotImplementedError

    def encode(self, grad: Any, residual: Any) -> Any:
        self._check_pair(grad, residual)
        xp = array_module(grad)
        ef = self.config.error_feedback
        if xp is not np:  # cupy: whole arrays, the same operations
            g = grad.reshape(-1)
            out = xp.empty(g.size, self.wire_dtype)
            if ef:
                r = residual.reshape(-1)
                r += g
                self._to_wire(r, out, xp)
                back = xp.empty_like(r)
                self._from_wire(out, back, xp)
                r -= back
                _forget_non_finite(r, xp)
            else:
                self._to_wire(g.astype(g.dtype, copy=False), out, xp)
            return out
        g = flat_input(grad)
        r = flat_inplace(residual, "residual") if ef else None
        out = np.empty(g.size, self.wire_dtype)

        def work(lo: int, hi: int) -> None:
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                if r is None:
                    self._to_wire(g[s:e], out[s:e], np)
                    continue
                rb = r[s:e]
                np.add(rb, g[s:e], out=rb)
                self._to_wire(rb, out[s:e], np)
                back = scratch.get("back_" + str(rb.dtype), e - s, rb.dtype)
                self._from_wire(out[s:e], back, np)
                with np.errstate(invalid="ignore"):  # inf - inf: forgotten just below
                    np.subtract(rb, back, out=rb)
                _forget_non_finite(rb, np)

        run_ranges(work, g.size)
        return out

    def decode(self, payload: Any, out: Any, accumulate: bool = False) -> Any:
        if out.dtype.kind != "f":
            raise TypeError(f"{self.name}: decode writes into a float array; got dtype {out.dtype}")
        p = self._check_payload(payload, out, self.wire_dtype)
        xp = array_module(out)
        if xp is not np or not out.flags.c_contiguous:
            vals = xp.empty(out.shape, out.dtype)
            self._from_wire(p.reshape(out.shape), vals, xp)
            if accumulate:
                out += vals
            else:
                out[...] = vals
            return out
        o = out.reshape(-1)

        def work(lo: int, hi: int) -> None:
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                if accumulate:
                    tmp = scratch.get("cast_dec_" + str(o.dtype), e - s, o.dtype)
                    self._from_wire(p[s:e], tmp, np)
                    np.add(o[s:e], tmp, out=o[s:e])
                else:
                    self._from_wire(p[s:e], o[s:e], np)

        run_ranges(work, o.size)
        return out


_FP16_MAX = 65504.0


class FP16(_Cast):
    name = "fp16"
    wire_dtype = np.float16
    dtypes = (np.float16, np.float32, np.float64)

    def _to_wire(self, x: Any, out: Any, xp: Any) -> None:
        if x.dtype == np.float16:
            out[...] = x
            return
        out[...] = xp.clip(x, -_FP16_MAX, _FP16_MAX).astype(xp.float16)
        inf = xp.isinf(x)  # saturation is for finite values: an overflow (inf) must still show as inf
        if bool(inf.any()):
            out[inf] = x[inf]

    def _from_wire(self, p: Any, out: Any, xp: Any) -> None:
        out[...] = p


class BF16(_Cast):
    name = "bf16"
    wire_dtype = np.uint16  # bfloat16 bit patterns
    dtypes = (np.float32,)

    def _to_wire(self, x: Any, out: Any, xp: Any) -> None:
        tmp = scratch.get("bf16_tmp", x.size, np.uint32) if xp is np else None
        f32_to_bf16_bits(x, out, xp, tmp)

    def _from_wire(self, p: Any, out: Any, xp: Any) -> None:
        if out.dtype == np.float32:
            bf16_bits_to_f32(p, out, xp)
        else:
            tmp = xp.empty(out.shape, xp.float32)
            bf16_bits_to_f32(p.reshape(out.shape), tmp, xp)
            out[...] = tmp
