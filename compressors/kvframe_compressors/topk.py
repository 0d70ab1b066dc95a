"""'topk': send the ``ceil(ratio * n)`` largest-magnitude elements of ``residual + grad``.

Error feedback: the residual keeps everything not sent, so over steps every bit of gradient mass
is eventually sent (the sent values plus the final residual sum to the pushed gradients).
Payload (uint8): ``k`` indices (uint32, or int64 when n >= 2**32) in ascending order, then the
``k`` values in the gradient's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvframe.arrays import array_module
from kvframe_compressors._blocks import flat_inplace, flat_input
from kvframe_compressors.base import BaseCompressor


class TopK(BaseCompressor):
    name = "topk"
    block_multiple = None  # the selection is global: no block-wise fusing
    dtypes = (np.float16, np.float32, np.float64)

    def k(self, size: int) -> int:
        if size == 0:
            return 0
        return min(int(size), max(1, math.ceil(self.config.ratio * int(size) - 1e-9)))

    @staticmethod
    def _index_dtype(size: int) -> Any:
        return np.uint32 if size < 2**32 else np.int64

    def compressed_nbytes(self, size: int, itemsize: int = 4) -> int:
        k = self.k(size)
        return k * (np.dtype(self._index_dtype(size)).itemsize + itemsize)

    def encode(self, grad: Any, residual: Any) -> Any:
        self._check_pair(grad, residual)
        xp = array_module(grad)
        n = grad.size
        if xp is np:
            g = flat_input(grad)
            r = flat_inplace(residual, "residual")
        else:
            g = grad.reshape(-1)
            r = residual.reshape(-1)
        r += g
        k = self.k(n)
        if k == n:
            idx = xp.arange(n, dtype=np.int64)
        else:
            idx = xp.argpartition(xp.abs(r), n - k)[n - k:]
            idx.sort()
        vals = r[idx]
        r[idx] = 0
        idt = np.dtype(self._index_dtype(n))
        out = xp.empty(k * (idt.itemsize + r.dtype.itemsize), np.uint8)
        out[: k * idt.itemsize].view(idt)[...] = idx.astype(idt)
        out[k * idt.itemsize:] = vals.view(np.uint8)  # byte copy: the values may sit unaligned
        return out

    def split_payload(self, payload: Any, size: int, dtype: Any) -> tuple[Any, Any]:
        """(indices, values) of a payload for ``size`` elements of ``dtype``."""
        idt = np.dtype(self._index_dtype(size))
        k = self.k(size)
        p = payload.reshape(-1).view(np.uint8)
        want = k * (idt.itemsize + np.dtype(dtype).itemsize)
        if p.size != want:
            raise ValueError(f"topk: a payload for {size} elements of {np.dtype(dtype)} has {want} bytes; got {p.size}")
        idx = p[: k * idt.itemsize].view(idt)
        vals = p[k * idt.itemsize:].copy().view(dtype)  # copy: the values may sit unaligned
        return idx, vals

    def decode(self, payload: Any, out: Any, accumulate: bool = False) -> Any:
        self.check_dtype(out.dtype, "output")
        if array_module(payload) is not array_module(out):
            raise TypeError("topk: decode needs the payload on the same kind of array as out")
        idx, vals = self.split_payload(payload, out.size, out.dtype)
        xp = array_module(out)
        contiguous = out.flags.c_contiguous
        o = out.reshape(-1) if contiguous else xp.zeros(out.size, out.dtype)
        if not accumulate:
            o[...] = 0
        elif not contiguous:
            o[...] = out.reshape(-1)
        idx = idx.astype(np.int64)
        o[idx] += vals  # indices are unique
        if not contiguous:
            out[...] = o.reshape(out.shape)
        return out
