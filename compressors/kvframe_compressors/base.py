"""What the built-in compressors share: dtype checks, payload checks and cupy dispatch."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvframe.arrays import array_module
from kvframe.errors import DTypeMismatchError, ShapeMismatchError


class BaseCompressor:
    """A gradient compressor (see :class:`kvframe.protocols.Compressor`).

    ``encode(grad, residual)`` folds ``grad`` into ``residual`` in place and returns the payload (a
    1-D array); ``decode(payload, out, accumulate=False)`` writes, or adds, the dense values into
    ``out``.  ``block_multiple``, when not None, says the codec is elementwise: encoding aligned
    slices of ``block_multiple`` elements separately gives the same values as encoding the whole
    array, so a store may fuse encode, transfer and decode block by block.
    """

    name = "?"
    block_multiple: int | None = None
    dtypes: tuple = (np.float32,)

    def __init__(self, config: Any):
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def compressed_nbytes(self, size: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def compression_ratio(self, size: int, itemsize: int = 4) -> float:
        """Uncompressed bytes over compressed bytes for ``size`` elements."""
        return size * itemsize / max(1, self.compressed_nbytes(size))

    def check_dtype(self, dtype: Any, what: str = "gradient") -> None:
        """Raise a clear error when this codec cannot encode ``dtype``."""
        if dtype in self.dtypes:
            return
        dt = np.dtype(dtype)
        if dt not in [np.dtype(d) for d in self.dtypes]:
            allowed = ", ".join(str(np.dtype(d)) for d in self.dtypes)
            raise DTypeMismatchError(f"{self.name} compression needs {allowed} {what}s; got dtype {dt}")

    def _check_pair(self, grad: Any, residual: Any) -> None:
        self.check_dtype(grad.dtype)
        if residual.dtype != grad.dtype:
            raise DTypeMismatchError(f"{self.name}: the residual has dtype {residual.dtype}, the gradient {grad.dtype}")
        if residual.size != grad.size:
            raise ShapeMismatchError(f"{self.name}: the residual has {residual.size} elements, the gradient "
                                     f"{grad.size} (shape {tuple(grad.shape)})")
        if array_module(residual) is not array_module(grad):
            raise TypeError(f"{self.name}: the residual and the gradient must both be numpy or both cupy arrays")

    def _check_payload(self, payload: Any, out: Any, dtype: Any = np.uint8) -> Any:
        """The payload as a 1-D array of ``dtype`` of the expected size for ``out``."""
        if array_module(payload) is not array_module(out):
            raise TypeError(f"{self.name}: decode needs the payload on the same kind of array as out "
                            f"(got {type(payload).__name__} and {type(out).__name__})")
        p = payload.reshape(-1)
        if p.dtype != np.dtype(dtype):
            if not p.flags.c_contiguous or p.nbytes % np.dtype(dtype).itemsize:
                raise ValueError(f"{self.name}: payload of dtype {p.dtype} cannot be read as {np.dtype(dtype)}")
            p = p.view(dtype)
        want = self.compressed_nbytes(out.size)
        if p.nbytes != want:
            raise ValueError(f"{self.name}: a payload for {out.size} elements has {want} bytes; got {p.nbytes}")
        return p
