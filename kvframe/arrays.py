"""Array helpers: numpy/cupy namespaces, DLPack at the boundary, and the row-sparse type."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, TypeAlias

import numpy as np

#: An array as the stores take and give it: a numpy ndarray, a cupy ndarray or a
#: :class:`RowSparseArray` (the front has turned DLPack producers such as torch tensors into one of
#: those). cupy ships no type information, so to a type checker this is ``Any``; the name says what
#: is meant.
Array: TypeAlias = Any


def array_module(x: Any) -> ModuleType:
    """numpy or cupy, whichever owns ``x`` (cupy is never imported unless it already is)."""
    if type(x) is np.ndarray:
        return np
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy
    if isinstance(x, RowSparseArray):
        return array_module(x.data)
    return np


def is_native(x: Any) -> bool:
    """A numpy or cupy ndarray, which the stores handle without conversion."""
    if isinstance(x, np.ndarray):
        return True
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def as_native(x: Any) -> Any:
    """A numpy/cupy view of ``x``: ndarrays pass through; DLPack producers (torch, JAX) are viewed
    without a copy where the memory allows (CPU memory becomes numpy, CUDA memory cupy).
    Returns None for anything else."""
    if is_native(x) or isinstance(x, RowSparseArray):
        return x
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        dev_type, _ = x.__dlpack_device__()
        if int(dev_type) in (1, 3):  # kDLCPU, kDLCUDAHost
            try:
                return np.from_dlpack(x)
            except (BufferError, TypeError, RuntimeError) as exc:  # e.g. bfloat16, which numpy lacks
                raise TypeError(f"cannot view {describe(x)} through DLPack as a numpy array: {exc} (convert it "
                                "first, e.g. bfloat16 to float32, or detach a tensor that requires grad)") from exc
        try:
            import cupy  # CUDA memory: cupy is needed to use it
        except ImportError:
            raise TypeError(f"{describe(x)} lives in GPU memory (DLPack device type {int(dev_type)}), which kvframe "
                            "uses through cupy, and cupy is not installed: pip install cupy-cuda12x (or "
                            "cupy-cuda13x), or move the array to the CPU first") from None
        return cupy.from_dlpack(x)
    return None


def describe(x: Any) -> str:
    """Short description of a value for error messages."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


class RowSparseArray:
    """A 2-D (or higher) array where only some rows are stored.

    ``data[i]`` is row ``indices[i]`` of the dense array of ``shape``; indices are sorted, unique
    int64.  Works with numpy and cupy ``data``.
    """

    stype = "row_sparse"

    def __init__(self, data: Any, indices: Any, shape: tuple[int, ...]):
        xp = array_module(data)
        shape = tuple(int(s) for s in shape)
        indices = xp.asarray(indices, dtype=np.int64).reshape(-1)
        if len(shape) < 1:
            raise ValueError("RowSparseArray needs a shape with at least one dimension")
        if data.shape != (indices.shape[0],) + shape[1:]:
            raise ValueError(f"RowSparseArray data of shape {tuple(data.shape)} does not fit {indices.shape[0]} "
                             f"row indices and dense shape {shape}: expected {(indices.shape[0],) + shape[1:]}")
        if indices.size:
            if int(indices.min()) < 0 or int(indices.max()) >= shape[0]:
                raise ValueError(f"RowSparseArray row indices must lie in [0, {shape[0]}); got "
                                 f"{int(indices.min())}..{int(indices.max())}")
            if indices.size > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise ValueError("RowSparseArray row indices must be sorted and unique; use "
                                 "RowSparseArray.from_rows to sum duplicate rows")
        self.data = data
        self.indices = indices
        self.shape = shape

    @property
    def dtype(self) -> Any:  # numpy's or cupy's dtype
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def from_dense(cls, dense: Any) -> RowSparseArray:
        """Keep the rows of ``dense`` that hold any non-zero value."""
        xp = array_module(dense)
        if dense.ndim < 1:
            raise ValueError(f"RowSparseArray.from_dense needs an array with at least one dimension (rows); got "
                             f"{describe(dense)}")
        # the row length is explicit: reshape(0, -1) cannot infer it when there are no rows
        row = 1
        for s in dense.shape[1:]:
            row *= int(s)
        flat = dense.reshape(dense.shape[0], row)
        rows = xp.nonzero((flat != 0).any(axis=1))[0].astype(np.int64)
        return cls(dense[rows], rows, dense.shape)

    @classmethod
    def from_rows(cls, data: Any, indices: Any, shape: tuple[int, ...]) -> RowSparseArray:
        """Like the constructor, but unsorted and repeated indices are allowed (repeats are summed)."""
        xp = array_module(data)
        indices = xp.asarray(indices, dtype=np.int64).reshape(-1)
        uniq, inverse = xp.unique(indices, return_inverse=True)
        summed = xp.zeros((uniq.shape[0],) + tuple(data.shape[1:]), dtype=data.dtype)
        xp.add.at(summed, inverse.reshape(-1), data)
        return cls(summed, uniq, shape)

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: Any = np.float32, xp: Any = np) -> RowSparseArray:
        return cls(xp.zeros((0,) + tuple(shape[1:]), dtype=dtype), xp.zeros(0, dtype=np.int64), shape)

    def todense(self) -> Any:
        xp = array_module(self.data)
        out = xp.zeros(self.shape, dtype=self.data.dtype)
        out[self.indices] = self.data
        return out

    def copy(self) -> RowSparseArray:
        return RowSparseArray(self.data.copy(), self.indices.copy(), self.shape)

    def __repr__(self) -> str:
        return f"RowSparseArray(shape={self.shape}, dtype={self.dtype}, rows={self.indices.shape[0]})"


def to_host(value: Any) -> Any:
    """``value`` in host memory: a numpy copy of a GPU array (data and indices of a row-sparse
    one); host values as they are."""
    if isinstance(value, RowSparseArray):
        if array_module(value.data) is np:
            return value
        return RowSparseArray(value.data.get(), value.indices.get(), value.shape)
    return value if array_module(value) is np else value.get()
