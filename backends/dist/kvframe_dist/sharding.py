"""The sharding plan: which server holds which part of a key, and which dtypes may travel."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

# only plain numeric dtypes travel; nothing else is ever built from a received name
WIRE_DTYPES = {name: np.dtype(name) for name in (
    "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")}


def wire_dtype(name: object) -> np.dtype:
    dt = WIRE_DTYPES.get(name) if isinstance(name, str) else None
    if dt is None:
        raise ValueError(f"dtype {name!r} cannot travel; allowed: {', '.join(WIRE_DTYPES)}")
    return dt


def dtype_name(dt: np.dtype) -> str:
    name = np.dtype(dt).name
    if name not in WIRE_DTYPES:
        raise TypeError(f"dtype {name} is not supported by the dist stores; use one of {', '.join(WIRE_DTYPES)}")
    return name


@dataclass(frozen=True)
class Shard:
    server: int
    part: int
    row_lo: int
    row_hi: int
    lo: int  # element offsets in the flattened array
    hi: int
    shape: tuple[int, ...]  # the shard's own shape: (rows, *shape[1:])


def plan(key_id: int, shape: tuple[int, ...], num_servers: int, bound: int) -> list[Shard]:
    """Where a key lives. Below ``bound`` elements the whole array goes to server
    ``(key * 9973) % S`` (as MXNet); above, it is split into S contiguous row ranges, range i on
    server i (1-D arrays split by elements, as MXNet)."""
    shape = tuple(int(s) for s in shape)
    rows = shape[0] if shape else 1
    row_size = prod(shape[1:]) if len(shape) > 1 else 1
    n = rows * row_size
    rest = shape[1:]
    if n < bound or num_servers == 1 or rows < 2:
        return [Shard((key_id * 9973) % num_servers, 0, 0, rows, 0, n, (rows, *rest) if shape else (1,))]
    shards = []
    bounds = [round(rows * i / num_servers) for i in range(num_servers + 1)]
    for i in range(num_servers):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            shards.append(Shard(i, i, lo, hi, lo * row_size, hi * row_size, (hi - lo, *rest)))
    return shards


__all__ = ["Shard", "plan", "wire_dtype", "dtype_name"]
