"""MXNet's threshold quantizers with error feedback: '2bit' (MXNet 1.x) and '1bit' (MXNet 2.0).

Wire layouts (identical to MXNet's):

* 2bit: 16 values per float32 word, ``ceil(n/16)`` words.  Value ``i`` lives in byte ``i >> 2``
  of the payload (byte ``(i & 15) >> 2`` of its word), in bits 7-6, 5-4, 3-2 or 1-0 for
  ``i & 3 = 0..3``; 11 means +t, 10 means -t, 00 (and 01) mean 0.
* 1bit: 32 values per float32 word, ``ceil(n/32)`` words.  Value ``i`` lives in byte ``i >> 3``,
  most significant bit first; 1 means +1, 0 means -1.

The payload is returned as uint8 (``payload.view(numpy.float32)`` is MXNet's compressed array).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvframe.arrays import array_module
from kvframe_compressors import _blocks
from kvframe_compressors._blocks import BLOCK, flat_inplace, flat_input, run_ranges, scratch
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


class TwoBit(BaseCompressor):
    name = "2bit"
    block_multiple = 16

    def __init__(self, config: Any):
        super().__init__(config)
        self.threshold = np.float32(config.threshold)
        self._neg = np.float32(-self.threshold)
        self._lut = _lut_2bit(self.threshold)

    def compressed_nbytes(self, size: int) -> int:
        return 4 * (-(-int(size) // 16))

    # encode ----------------------------------------------------------------------------------
    def encode(self, grad: Any, residual: Any) -> Any:
        self._check_pair(grad, residual)
        if array_module(grad) is not np:
            from kvframe_compressors import _cuda

            return _cuda.encode_2bit(grad, residual, self.threshold, self.compressed_nbytes(grad.size))
        g = flat_input(grad)
        r = flat_inplace(residual, "residual")
        n = g.size
        out = np.empty(self.compressed_nbytes(n), np.uint8)
        used = -(-n // 4)
        out[used:] = 0
        t, neg_t = self.threshold, self._neg
        if n <= BLOCK:
            self._encode_block(r, g, out[:used], t, neg_t)
            return out

        def work(lo: int, hi: int) -> None:
            for s in range(lo, hi, BLOCK):
                e = min(s + BLOCK, hi)
                self._encode_block(r[s:e], g[s:e], out[s // 4:-(-e // 4)], t, neg_t)

        run_ranges(work, n)
        return out

    @staticmethod
    def _encode_block(r: np.ndarray, g: np.ndarray, out: np.ndarray, t: np.float32, neg_t: np.float32) -> None:
        """One block (at most BLOCK values; ``out`` holds ceil(n / 4) bytes)."""
        n = r.size
        npad = (n + 3) & ~3
        b = scratch.block()
        pos, neg, q, d = b.pos[:npad], b.neg[:npad], b.q[:n], b.d[:n]
        np.add(r, g, out=r)
        np.greater_equal(r, t, out=pos[:n])
        np.less_equal(r, neg_t, out=neg[:n])
        if npad > n:
            pos[n:] = False
            neg[n:] = False
        # r -= t where r >= t; r -= -t where r <= -t (exactly MXNet's float32 operations)
        np.subtract(pos[:n].view(np.int8), neg[:n].view(np.int8), out=q)
        np.copyto(d, q, casting="unsafe")
        np.multiply(d, t, out=d)
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
        p = self._check_payload(payload, out)
        if array_module(out) is not np:
            from kvframe_compressors import _cuda

            return _cuda.decode_2bit(p, out, self.threshold, accumulate)
        target = out if out.flags.c_contiguous and out.flags.writeable else np.empty(out.shape, out.dtype)
        o = target.reshape(-1)
        n = o.size
        lut = self._lut

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

        if accumulate and target is not out:
            target[...] = out
        if n <= BLOCK:
            work(0, n)
        else:
            run_ranges(work, n)
        if target is not out:
            out[...] = target
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

        def work(lo: int, hi: int) -> None:
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
        target = out if out.flags.c_contiguous and out.flags.writeable else np.empty(out.shape, out.dtype)
        o = target.reshape(-1)
        n = o.size
        lut = self._lut

        def work(lo: int, hi: int) -> None:
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

        if accumulate and target is not out:
            target[...] = out
        if n <= BLOCK:
            work(0, n)
        else:
            run_ranges(work, n)
        if target is not out:
            out[...] = target
        return out


__all__ = ["TwoBit", "OneBit", "_blocks"]
