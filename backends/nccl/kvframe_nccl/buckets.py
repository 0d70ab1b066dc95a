"""Packing many small keys into buckets: one flat buffer per dtype, one collective, then unpack.

Pure functions over an array module (numpy or cupy), so the plan and the packing are tested on
the CPU with numpy and run unchanged on the GPU with cupy. Copies go through same-size unsigned
integer views, so they are bit copies for every dtype (bfloat16 included) and need no arithmetic
kernels for the dtype.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Member:
    """One key inside a unit: ``flat[offset:offset+size].reshape(shape)`` is its value."""

    index: int  # position of the key in the call
    key: Hashable
    offset: int  # in elements
    size: int
    shape: tuple[int, ...]


@dataclass
class Unit:
    """What one collective moves: a single key, or a bucket of small keys of one dtype."""

    dtype: np.dtype
    members: list[Member] = field(default_factory=list)
    count: int = 0  # elements

    @property
    def packed(self) -> bool:
        return len(self.members) > 1

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def plan(items: Sequence[tuple[Hashable, tuple[int, ...], Any]], bucket_bytes: int, pack_threshold: int) -> list[Unit]:
    """Group ``(key, shape, dtype)`` items into units.

    A key of more than ``pack_threshold`` bytes (or every key when ``bucket_bytes`` is 0) is a unit of
    its own. Smaller keys are packed, per dtype and in call order, into buckets of at most
    ``bucket_bytes``. Units come out in the order their first key appears; a bucket that ends up
    with one key is just that key.
    """
    units: list[Unit] = []
    open_bucket: dict[str, Unit] = {}
    for index, (key, shape, dtype) in enumerate(items):
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        nbytes = size * dtype.itemsize
        if bucket_bytes <= 0 or nbytes > pack_threshold or nbytes > bucket_bytes:
            units.append(Unit(dtype, [Member(index, key, 0, size, tuple(shape))], size))
            continue
        bucket = open_bucket.get(dtype.str)
        if bucket is None or (bucket.count + size) * dtype.itemsize > bucket_bytes:
            bucket = open_bucket[dtype.str] = Unit(dtype)
            units.append(bucket)
        bucket.members.append(Member(index, key, bucket.count, size, tuple(shape)))
        bucket.count += size
    return units


def bits(a: Any) -> Any:
    """A flat unsigned-integer view of contiguous ``a`` with the same item size (for bit copies)."""
    return a.reshape(-1).view(np.dtype(f"u{a.dtype.itemsize}"))


def pack(xp: Any, arrays: Sequence[Any], out: Any) -> Any:
    """Copy ``arrays`` one after another into the flat, contiguous ``out`` (same dtype); returns out."""
    flats = [bits(xp.ascontiguousarray(a)) for a in arrays]
    total = sum(int(f.size) for f in flats)
    if total != out.size:
        raise ValueError(f"packing {total} elements into a buffer of {out.size}")
    if not flats:
        return out
    target = bits(out)
    try:
        xp.concatenate(flats, out=target)
    except TypeError:  # an array module without concatenate(out=)
        off = 0
        for f in flats:
            target[off:off + f.size] = f
            off += f.size
    return out


def views(flat: Any, unit: Unit) -> list[Any]:
    """Each member's value as a view into the unit's flat buffer, in member order."""
    return [flat[m.offset:m.offset + m.size].reshape(m.shape) for m in unit.members]


def unpack(flat: Any, unit: Unit, outs: Sequence[Any]) -> None:
    """Copy each member's slice of ``flat`` into ``outs[i]`` (one out per member; None skips)."""
    src = bits(flat)
    for m, o in zip(unit.members, outs):
        if o is None:
            continue
        piece = src[m.offset:m.offset + m.size]
        if o.flags.c_contiguous:
            bits(o)[...] = piece
        else:
            o[...] = piece.view(o.dtype).reshape(m.shape)


__all__ = ["Member", "Unit", "plan", "pack", "unpack", "views", "bits"]
