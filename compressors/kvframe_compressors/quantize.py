"""MXNet's threshold quantizers with error feedback: '2bit' (MXNet 1.x) and '1bit' (MXNet 2.0).

Wire layouts (identical to MXNet's):

* 2bit: 16 values per float32 word, ``ceil(n/16)`` words.  Value ``i`` lives in byte ``i >> 2``
  of the payload (byte ``(i & 15) >> 2`` of its word), in bits 7-6, 5-4, 3-2 or 1-0 for
  ``i & 3 = 0..3``; 11 means +t, 10 means -t, 00 (and 01) mean 0.
* 1bit: 32 values per float32 word, ``ceil(n/32)`` words.  Value ``i`` lives in byte ``i >> 3``,
  most significant bit first; 1 means +1, 0 means -1.

The payload is returned as uint8 (``payload.view(numpy.float32)`` is MXNet's compressed array).

2bit with ``threshold_scale='rms'`` (scale-free; not MXNet's) prefixes one float32 word, the value
``v`` this push sends (codes 11 and 10 decode to ``+v`` and ``-v``), followed by the codes above:
with ``x`` the residual-corrected gradient, the values with ``|x| >= threshold * RMS(x)`` are sent,
and ``v`` is the mean of their ``|x|`` (the least-squares value for them). Or the word is ``-1``,
followed by the raw float32 values: arrays of fewer than ``raw_below`` elements, and pushes whose
RMS is not finite (the residual is then cleared).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvframe.arrays import array_module
from kvframe.errors import ShapeMismatchError
from kvframe_compressors import _blocks, _kernels
from kvframe_compressors._blocks import BLOCK, decode_through, flat_inplace, flat_input, run_ranges, scratch
from kvframe_compressors.base import BaseCompressor

_GATHER_CODES = np.uint32(1 | 1 << 10 | 1 << 20 | 1 << 30)
_SHIFT_24 = np.uint32(24)
_MINUS_TWO = np.float32(-2)
_ONE = np.float32(1)


def _lut_2bit(t: np.float32) -> np.ndarray:
    """Byte -> its 4 decoded values, as 256 complex128 items (16 bytes each) for a fast np.take."""
    vals = np.array([0.0, 0.0, -t, t], np.float32)  # code 00, 01, 10, 11
    b = np.arange(256)
    lut = np.stack([vals[(b >> s) & 3] for s in (6, 4, 2, 0)], axis=1).astype(np.float32)
    return np.ascontiguousarray(lut).view(np.complex128).reshape(256)


def _lut_1bit() -> np.ndarray:
    """Byte -> its 8 decoded values (+1/-1), most significant bit first, shape (256, 8)."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
    return np.where(bits == 1, np.float32(1), np.float32(-1)).astype(np.float32)


_RAW = np.float32(-1)  # rms payload header: raw float32 values follow


class TwoBit(BaseCompressor):
    name = "2bit"
    block_multiple: int | None = 16

    def __init__(self, config: Any):
        super().__init__(config)
        self.threshold = np.float32(config.threshold)
        self._neg = np.float32(-self.threshold)
        self._lut = _lut_2bit(self.threshold)
        self.rms = getattr(config, "threshold_scale", "absolute") == "rms"
        self.raw_below = int(getattr(config, "raw_below", 0) or 0)
        if self.rms:
            self.block_multiple = None  # each push's threshold depends on the whole array

    def _codes_nbytes(self, size: int) -> int:
        return 4 * (-(-int(size) // 16))

    def compressed_nbytes(self, size: int) -> int:
        """Bytes of the payload for ``size`` values (rms scale: the codes' form, plus the header)."""
        if not self.rms:
            return self._codes_nbytes(size)
        return 4 + (4 * int(size) if int(size) < self.raw_below else self._codes_nbytes(size))

    # encode ----------------------------------------------------------------------------------
    def encode(self, grad: Any, residual: Any) -> Any:
        self._check_pair(grad, residual)
        if self.rms:
            return self._encode_rms(grad, residual)
        if array_module(grad) is not np:
            from kvframe_compressors import _cuda

            return _cuda.encode_2bit(grad, residual, self.threshold, self.compressed_nbytes(grad.size))
        out = np.empty(self.compressed_nbytes(grad.size), np.uint8)
        self._encode_codes(flat_input(grad), flat_inplace(residual, "residual"), out, self.threshold, self._neg)
        return out

    def _encode_codes(self, g: np.ndarray | None, r: np.ndarray, out: np.ndarray, t: np.float32,
                      neg_t: np.float32, v: np.float32 | None = None) -> None:
        """Fold ``g`` into ``r`` (unless None) and write the codes of threshold ``t`` into ``out``;
        a value sent is ``+-v`` (MXNet's: ``v = t``), taken from the residual."""
        n = r.size
        used = -(-n // 4)
        out[used:] = 0
        v = t if v is None else v
        k = _kernels.numba_kernels()
        if k is not None:
            src, use_g = (r, False) if g is None else (g, True)

            def kernel(lo: int, hi: int) -> None:
                k.encode_2bit(src[lo:hi], r[lo:hi], out[lo >> 2:(hi + 3) >> 2], t, v, use_g)

            run_ranges(kernel, n)
            return
        if n <= BLOCK:
            self._encode_block(r, g, out[:used], t, neg_t, v)
            return

        def work(lo: int, hi: int) -> None:
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                self._encode_block(r[s:e], None if g is None else g[s:e], out[s // 4:-(-e // 4)], t, neg_t, v)

        run_ranges(work, n)

    def _encode_rms(self, grad: Any, residual: Any) -> Any:
        """The scale-free form. With ``x = residual + grad``: values with ``|x| >= t``, where ``t`` is
        ``threshold`` x RMS(x), are sent as ``+-v``, ``v`` being the mean of their ``|x|`` (the value
        that leaves the least error over them); ``v`` travels first, the rest stays in the residual."""
        xp = array_module(grad)
        n = grad.size
        if xp is np:
            g, r = flat_input(grad), flat_inplace(residual, "residual")
        else:
            g, r = grad.reshape(-1), residual.reshape(-1)
            if not residual.flags.c_contiguous:
                raise ValueError("the residual must be a C-contiguous array (it is updated in place)")
        if n < self.raw_below or n == 0:
            return self._raw(xp, r, g)
        r += g
        mag = xp.abs(r)
        rms = float(xp.sqrt(xp.dot(mag, mag) / n))
        if not np.isfinite(rms):  # NaN or inf: sent once, never kept in the residual
            return self._raw(xp, r, None)
        t = np.float32(self.threshold * rms)
        above = mag >= t
        count = int(xp.count_nonzero(above))
        if count and t > 0:
            total = np.dot(mag, above.astype(np.float32)) if xp is np else (mag * above).sum(dtype=np.float64)
            v = np.float32(float(total) / count)
        else:
            v = np.float32(0)
        out = xp.empty(4 + self._codes_nbytes(n), np.uint8)
        out[:4] = xp.asarray(np.array([v], np.float32).view(np.uint8))
        if not v > 0:  # an all-zero push (or one too small for float32): nothing to send
            out[4:] = 0
            return out
        if xp is np:
            self._encode_codes(None, r, out[4:], t, np.float32(-t), v)
        else:
            self._encode_codes_xp(xp, r, out[4:], t, v)
        return out

    @staticmethod
    def _encode_codes_xp(xp: Any, r: Any, out: Any, t: np.float32, v: np.float32) -> None:
        """The codes of ``r`` for threshold ``t`` and value ``v`` with array operations (cupy), in
        the layout of the CPU blocks: 4 values per byte, the first in bits 7-6."""
        n = r.size
        pos = r >= t
        neg = r <= -t
        r -= (pos.astype(np.float32) - neg.astype(np.float32)) * v
        codes = pos.astype(np.uint8) * 3 + neg.astype(np.uint8) * 2
        npad = -(-n // 4) * 4
        if npad != n:
            codes = xp.concatenate([codes, xp.zeros(npad - n, np.uint8)])
        q = codes.reshape(-1, 4)
        packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
        out[:] = 0
        out[:packed.size] = packed

    @staticmethod
    def _raw(xp: Any, r: Any, g: Any) -> Any:
        """Header -1 and the exact values of ``r + g``; the residual becomes zero."""
        n = r.size
        out = xp.empty(4 + 4 * n, np.uint8)
        out[:4] = xp.asarray(np.array([_RAW], np.float32).view(np.uint8))
        values = out[4:].view(np.float32)
        if g is None:
            values[...] = r
        else:
            xp.add(r, g, out=values)
        r[...] = 0
        return out

    @staticmethod
    def _encode_block(r: np.ndarray, g: np.ndarray | None, out: np.ndarray, t: np.float32,
                      neg_t: np.float32, v: np.float32) -> None:
        """One block (at most BLOCK values; ``out`` holds ceil(n / 4) bytes)."""
        n = r.size
        npad = (n + 3) & ~3
        b = scratch.block()
        pos, neg, q, d = b.pos[:npad], b.neg[:npad], b.q[:n], b.d[:n]
        if g is not None:
            np.add(r, g, out=r)
        np.greater_equal(r, t, out=pos[:n])
        np.less_equal(r, neg_t, out=neg[:n])
        if npad > n:
            pos[n:] = False
            neg[n:] = False
        # r -= t where r >= t; r -= -t where r <= -t (exactly MXNet's float32 operations)
        np.subtract(pos[:n].view(np.int8), neg[:n].view(np.int8), out=q)
        np.copyto(d, q, casting="unsafe")
        np.multiply(d, v, out=d)
        np.subtract(r, d, out=r)
        # Codes 11 = +t, 10 = -t, 00: code = 2 * (pos | neg) + pos, computed on 4 values at once
        # (one little-endian uint32 holds the flags of 4 values, one per byte, so no carries).
        # Then the four codes c0 | c1 << 8 | c2 << 16 | c3 << 24 become the byte
        # c0 << 6 | c1 << 4 | c2 << 2 | c3: the multiply moves each code into the top byte while
        # the other partial products stay in disjoint bits below it.
        p32, n32, w = pos.view(np.uint32), neg.view(np.uint32), b.words[: npad // 4]
        np.add(p32, n32, out=w)
        np.add(w, w, out=w)
        np.add(w, p32, out=w)
        np.multiply(w, _GATHER_CODES, out=w)
        np.right_shift(w, _SHIFT_24, out=w)
        out[:] = w

    # decode ----------------------------------------------------------------------------------
    def decode(self, payload: Any, out: Any, accumulate: bool = False) -> Any:
        self.check_dtype(out.dtype, "output")
        if self.rms:
            return self._decode_rms(payload, out, accumulate)
        p = self._check_payload(payload, out)
        if array_module(out) is not np:
            from kvframe_compressors import _cuda

            return _cuda.decode_2bit(p, out, self.threshold, accumulate)
        return self._decode_codes(p, out, accumulate, self.threshold, self._lut)

    def _decode_rms(self, payload: Any, out: Any, accumulate: bool) -> Any:
        xp = array_module(out)
        if array_module(payload) is not xp:
            raise TypeError(f"{self.name}: decode needs the payload on the same kind of array as out "
                            f"(got {type(payload).__name__} and {type(out).__name__})")
        p = payload.reshape(-1)
        if p.dtype != np.uint8:
            p = p.view(np.uint8)
        n = out.size
        if p.size < 4:
            raise ValueError(f"{self.name}: a payload (rms scale) starts with its 4-byte value; got {p.size} bytes")
        t = np.float32(float(p[:4].view(np.float32)[0]))
        body = p[4:]
        if t < 0:  # raw values
            if body.size != 4 * n:
                raise ValueError(f"{self.name}: raw payload for {n} elements has {4 * n + 4} bytes; got {p.size}")
            values = body.view(np.float32).reshape(out.shape)
            if accumulate:
                out += values
            else:
                out[...] = values
            return out
        if body.size != self._codes_nbytes(n) or not np.isfinite(t):
            raise ValueError(f"{self.name}: a payload for {n} elements has {4 + self._codes_nbytes(n)} bytes "
                             f"and a finite value; got {p.size} bytes, value {t}")
        if xp is not np:
            from kvframe_compressors import _cuda

            return _cuda.decode_2bit(body, out, t, accumulate)
        return self._decode_codes(body, out, accumulate, t)

    def _decode_codes(self, p: np.ndarray, out: np.ndarray, accumulate: bool, t: np.float32,
                      lut: np.ndarray | None = None) -> np.ndarray:
        k = _kernels.numba_kernels()
        if k is not None:
            pc, acc = np.ascontiguousarray(p), bool(accumulate)

            def work(o: np.ndarray, lo: int, hi: int) -> None:
                k.decode_2bit(pc[lo >> 2:(hi + 3) >> 2], o[lo:hi], t, acc)
        else:
            table = _lut_2bit(t) if lut is None else lut

            def work(o: np.ndarray, lo: int, hi: int) -> None:
                self._decode_blocks(p, o, accumulate, table)(lo, hi)

        return decode_through(out, accumulate, work)

    @staticmethod
    def _decode_blocks(p: np.ndarray, o: np.ndarray, accumulate: bool, lut: np.ndarray):
        """The numpy decoder of ``o``'s range [lo, hi), block by block, through the byte table."""

        def work(lo: int, hi: int) -> None:
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                src = p[s // 4:-(-e // 4)]
                dst = o[s:e]
                if not accumulate and (e - s) % 4 == 0:
                    np.take(lut, src, out=dst.view(np.complex128))
                    continue
                tmp = scratch.block().dec[: src.size * 4]
                np.take(lut, src, out=tmp.view(np.complex128))
                if accumulate:
                    np.add(dst, tmp[: e - s], out=dst)
                else:
                    dst[:] = tmp[: e - s]

        return work

    # encode + decode in one pass -------------------------------------------------------------
    def encode_decode_into(self, grad: Any, residual: Any, out: Any, accumulate: bool = False) -> Any:
        """``out (+)= decode(encode(grad, residual))``, the residual updated: bit-identical to
        ``decode(encode(grad, residual), out, accumulate)``; one pass without a payload on the
        compiled path (and on cupy), else exactly that."""
        if self.rms:
            return self.decode(self.encode(grad, residual), out, accumulate=accumulate)
        return _encode_decode(self, "encode_decode_2bit", grad, residual, out, accumulate)

    def encode_decode_sum_into(self, grads: Any, residuals: Any, out: Any, accumulate: bool = False) -> Any:
        """``out (+)= sum of decode(encode(grads[i], residuals[i]))``, added in copy order: bit-identical
        to ``encode_decode_into`` per copy (the first assigns unless ``accumulate``), in one pass."""
        return _encode_decode_sum(self, "encode_decode_sum_2bit", grads, residuals, out, accumulate)


_F32 = np.dtype(np.float32)


def _encode_decode(comp: Any, kernel: str, grad: Any, residual: Any, out: Any, accumulate: bool) -> Any:
    """The one-pass encode + decode of ``comp`` (its compiled ``kernel``), or its two steps."""
    k = _kernels.numba_kernels()
    if (k is not None and type(grad) is np.ndarray and type(residual) is np.ndarray and type(out) is np.ndarray
            and grad.dtype is _F32 and residual.dtype is _F32 and out.dtype is _F32
            and grad.ndim == 1 and grad.shape == residual.shape == out.shape and grad.size < _blocks.PARALLEL_MIN
            and grad.flags.c_contiguous and residual.flags.c_contiguous and out.flags.c_contiguous
            and residual.flags.writeable and out.flags.writeable):
        # the store's fused path: one cache block of flat float32 arrays; checked, so call at once
        getattr(k, kernel)(grad, residual, out, comp.threshold, bool(accumulate))
        return out
    comp._check_pair(grad, residual)
    comp.check_dtype(out.dtype, "output")
    if out.size != grad.size:
        raise ShapeMismatchError(f"{comp.name}: the output has {out.size} elements, the gradient {grad.size}")
    if array_module(out) is not array_module(grad):
        raise TypeError(f"{comp.name}: the output and the gradient must both be numpy or both cupy arrays")
    if array_module(grad) is not np:
        from kvframe_compressors import _cuda

        return getattr(_cuda, kernel)(grad, residual, out, comp.threshold, accumulate)
    k = _kernels.numba_kernels()
    if k is None:
        return comp.decode(comp.encode(grad, residual), out, accumulate=accumulate)
    fn = getattr(k, kernel)
    g, r = flat_input(grad), flat_inplace(residual, "residual")
    direct = out.flags.c_contiguous and out.flags.writeable
    target = out if direct else (np.array(out, order="C") if accumulate else np.empty(out.shape, out.dtype))
    o, t, acc = target.reshape(-1), comp.threshold, bool(accumulate)

    def work(lo: int, hi: int) -> None:
        fn(g[lo:hi], r[lo:hi], o[lo:hi], t, acc)

    run_ranges(work, g.size)
    if not direct:
        out[...] = target
    return out


def _plain_f32(x: Any, shape: tuple) -> bool:
    """A writeable 1-D C-contiguous float32 numpy array of ``shape`` (what the kernels take as is)."""
    return (type(x) is np.ndarray and x.dtype is _F32 and x.shape == shape and x.flags.c_contiguous
            and x.flags.writeable)


def _encode_decode_sum(comp: Any, kernel: str, grads: Any, residuals: Any, out: Any, accumulate: bool) -> Any:
    """The one-pass merge of several copies (compiled ``kernel``), or ``encode_decode_into`` per copy."""
    grads, residuals = list(grads), list(residuals)
    if len(grads) != len(residuals) or not grads:
        raise ValueError(f"{comp.name}: encode_decode_sum_into needs one residual per gradient, at least one; "
                         f"got {len(grads)} gradients and {len(residuals)} residuals")
    k = _kernels.numba_kernels()
    shape = (out.size,)
    if (k is not None and not getattr(comp, "rms", False) and _plain_f32(out, out.shape) and out.ndim == 1
            and all(_plain_f32(a, shape) for a in grads) and all(_plain_f32(a, shape) for a in residuals)):
        fn, t, acc = getattr(k, kernel), comp.threshold, bool(accumulate)

        def work(lo: int, hi: int) -> None:
            fn(tuple(g[lo:hi] for g in grads), tuple(r[lo:hi] for r in residuals), out[lo:hi], t, acc)

        run_ranges(work, out.size)
        return out
    for i, (g, r) in enumerate(zip(grads, residuals)):
        comp.encode_decode_into(g, r, out, accumulate or i > 0)
    return out


class OneBit(BaseCompressor):
    name = "1bit"
    block_multiple = 32

    def __init__(self, config: Any):
        super().__init__(config)
        self.threshold = np.float32(config.threshold)

    _lut = _lut_1bit()

    def compressed_nbytes(self, size: int) -> int:
        return 4 * (-(-int(size) // 32))

    def encode(self, grad: Any, residual: Any) -> Any:
        self._check_pair(grad, residual)
        if array_module(grad) is not np:
            from kvframe_compressors import _cuda

            return _cuda.encode_1bit(grad, residual, self.threshold, self.compressed_nbytes(grad.size))
        g = flat_input(grad)
        r = flat_inplace(residual, "residual")
        n = g.size
        out = np.empty(self.compressed_nbytes(n), np.uint8)
        out[-(-n // 8):] = 0
        t = self.threshold
        k = _kernels.numba_kernels()

        def work(lo: int, hi: int) -> None:
            if k is not None:
                k.encode_1bit(g[lo:hi], r[lo:hi], out[lo >> 3:(hi + 7) >> 3], t)
                return
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                self._encode_block(r[s:e], g[s:e], out[s // 8:-(-e // 8)], t)

        if n <= BLOCK:
            work(0, n)
        else:
            run_ranges(work, n)
        return out

    @staticmethod
    def _encode_block(r: np.ndarray, g: np.ndarray, out: np.ndarray, t: np.float32) -> None:
        n = r.size
        npad = (n + 7) & ~7
        b = scratch.block()
        bit, d = b.pos[:npad], b.d[:n]
        np.add(r, g, out=r)
        np.greater(r, t, out=bit[:n])
        if npad > n:
            bit[n:] = False
        np.copyto(d, bit[:n], casting="unsafe")  # bit 1: r -= 1, bit 0: r += 1 (one exact step of +-1)
        np.multiply(d, _MINUS_TWO, out=d)
        np.add(d, _ONE, out=d)
        np.add(r, d, out=r)
        out[:] = np.packbits(bit)

    def decode(self, payload: Any, out: Any, accumulate: bool = False) -> Any:
        self.check_dtype(out.dtype, "output")
        p = self._check_payload(payload, out)
        if array_module(out) is not np:
            from kvframe_compressors import _cuda

            return _cuda.decode_1bit(p, out, accumulate)
        lut = self._lut
        k = _kernels.numba_kernels()
        if k is not None:
            p = np.ascontiguousarray(p)
            accumulate = bool(accumulate)

        def work(o: np.ndarray, lo: int, hi: int) -> None:
            if k is not None:
                k.decode_1bit(p[lo >> 3:(hi + 7) >> 3], o[lo:hi], accumulate)
                return
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                src = p[s // 8:-(-e // 8)]
                dst = o[s:e]
                if not accumulate and (e - s) % 8 == 0:
                    np.take(lut, src, axis=0, out=dst.reshape(-1, 8))
                    continue
                tmp = scratch.get("dec1", (src.size, 8), np.float32)
                np.take(lut, src, axis=0, out=tmp)
                flat = tmp.reshape(-1)[: e - s]
                if accumulate:
                    np.add(dst, flat, out=dst)
                else:
                    dst[:] = flat

        return decode_through(out, accumulate, work)

    def encode_decode_into(self, grad: Any, residual: Any, out: Any, accumulate: bool = False) -> Any:
        """``out (+)= decode(encode(grad, residual))``, the residual updated: bit-identical to
        ``decode(encode(grad, residual), out, accumulate)``; one pass without a payload on the
        compiled path (and on cupy), else exactly that."""
        return _encode_decode(self, "encode_decode_1bit", grad, residual, out, accumulate)

    def encode_decode_sum_into(self, grads: Any, residuals: Any, out: Any, accumulate: bool = False) -> Any:
        """``out (+)= sum of decode(encode(grads[i], residuals[i]))``, added in copy order: bit-identical
        to ``encode_decode_into`` per copy (the first assigns unless ``accumulate``), in one pass."""
        return _encode_decode_sum(self, "encode_decode_sum_1bit", grads, residuals, out, accumulate)


__all__ = ["TwoBit", "OneBit", "_blocks"]
