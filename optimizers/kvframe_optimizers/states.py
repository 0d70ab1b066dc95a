"""What an optimizer keeps per key, shared by the rules, the updater and the checkpoint format."""

from __future__ import annotations

from typing import Any

import numpy as np

MASTER = "weight32"  # name of the float32 master copy of a float16 weight (multi_precision)


class KeyState:
    """What an optimizer keeps for one key: arrays (momentum, moments, master copy...), the key's
    update count, JSON-able scalars, and the weight's shape and dtype it was made for."""

    __slots__ = ("arrays", "count", "scalars", "shape", "dtype", "xp", "scratch")

    def __init__(self, arrays: dict, count: int, scalars: dict, shape: tuple, dtype: np.dtype, xp: Any = np):
        self.arrays = arrays
        self.count = count
        self.scalars = scalars
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.xp = xp
        self.scratch: dict = {}  # work buffers, never saved
