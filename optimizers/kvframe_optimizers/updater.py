"""The updater a store calls on push.

``updater(key, grad, weight)`` creates the key's states on first use and runs one optimizer step;
``get_states()``/``set_states()`` save and load them in the format of :mod:`kvframe_optimizers.checkpoint`.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from kvframe.arrays import RowSparseArray, array_module
from kvframe.errors import DTypeMismatchError, ShapeMismatchError
from kvframe_optimizers.checkpoint import StatesFormatError, check_states_for, read_states, saved_config, write_states
from kvframe_optimizers.states import MASTER, KeyState

if TYPE_CHECKING:
    from kvframe_optimizers.base import Optimizer


def _to_numpy(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()

class Updater:
    """``updater(key, grad, weight)``: one optimizer step, with states created on first use."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.states: dict[Hashable, KeyState] = {}
        self._lock = threading.Lock()

    def __call__(self, key: Hashable, grad: Any, weight: Any) -> None:
        ks = self.states.get(key)
        if ks is None:
            with self._lock:
                ks = self.states.get(key)
                if ks is None:
                    ks = self.states[key] = self.optimizer.create_state(key, weight)
        self._check(key, ks, grad, weight)
        self.optimizer.update(key, weight, grad, ks)

    def check(self, key: Hashable, grad: Any, weight: Any) -> None:
        """Raise what ``self(key, grad, weight)`` would refuse, changing nothing: a store checks every
        key of a push this way before it updates any, so a refused key leaves the others as they were."""
        ks = self.states.get(key)
        if ks is None:
            self.optimizer.check_weight(key, tuple(weight.shape), weight.dtype)
            if tuple(grad.shape) != tuple(weight.shape):
                raise ShapeMismatchError(f"key {key!r}: the gradient has shape {tuple(grad.shape)}, but the weight "
                                         f"has shape {tuple(weight.shape)}")
        else:
            self._refuse(key, ks, grad, weight)
        if isinstance(grad, RowSparseArray) and array_module(grad.data) is not array_module(weight):
            raise TypeError(f"key {key!r}: the gradient lives on another device than the weight")

    def _refuse(self, key: Hashable, ks: KeyState, grad: Any, weight: Any) -> None:
        if tuple(weight.shape) != ks.shape:
            raise ShapeMismatchError(f"key {key!r}: the optimizer states were made for a weight of shape {ks.shape}, "
                                     f"but the weight has shape {tuple(weight.shape)}")
        if weight.dtype != ks.dtype:
            raise DTypeMismatchError(f"key {key!r}: the optimizer states were made for dtype {ks.dtype}, but the "
                                     f"weight has dtype {weight.dtype}")
        if tuple(grad.shape) != ks.shape:
            raise ShapeMismatchError(f"key {key!r}: the gradient has shape {tuple(grad.shape)}, but the weight has "
                                     f"shape {ks.shape}")

    def _check(self, key: Hashable, ks: KeyState, grad: Any, weight: Any) -> None:
        self._refuse(key, ks, grad, weight)
        xp = array_module(weight)
        if ks.xp is not xp:  # states loaded from a file (numpy) meet a cupy weight, or the other way
            ks.arrays = {n: (xp.asarray(a) if xp is not np else _to_numpy(a)) for n, a in ks.arrays.items()}
            ks.scratch = {}
            ks.xp = xp
        if isinstance(grad, RowSparseArray) and array_module(grad.data) is not xp:
            raise TypeError(f"key {key!r}: the gradient lives on another device than the weight")

    # checkpoints ----------------------------------------------------------------------------
    def get_states(self, dump_optimizer: bool = False) -> bytes:
        opt = self.optimizer
        entries: dict[str, np.ndarray] = {}
        keys = []
        for i, (key, ks) in enumerate(self.states.items()):
            names = {}
            for name, arr in ks.arrays.items():
                fname = f"k{i}.{name}"
                entries[fname] = _to_numpy(arr)
                names[name] = fname
            keys.append({"key": key, "shape": list(ks.shape), "dtype": ks.dtype.name, "count": ks.count,
                         "scalars": ks.scalars, "arrays": names})
        meta = {"optimizer": opt.config.type, "num_update": opt.num_update, "globals": opt.globals, "keys": keys}
        if dump_optimizer:
            meta["config"] = opt.config.model_dump(mode="json")
        return write_states(meta, entries)

    def set_states(self, data: bytes) -> None:
        """Replace every state with those in ``data`` (from :meth:`get_states`); with a dumped
        config the optimizer also takes that config.  Nothing changes if the data is refused."""
        meta, arrays = read_states(data)
        opt = self.optimizer
        config = saved_config(opt, meta)
        check_states_for(opt, meta, arrays)
        states: dict[Hashable, KeyState] = {}
        for entry in meta.get("keys", []):
            key = entry["key"]
            if isinstance(key, list):
                raise StatesFormatError(f"bad key {key!r} in the states file")
            st = {name: np.array(arrays[fname], copy=True) for name, fname in entry["arrays"].items()}
            states[key] = KeyState(st, int(entry["count"]), dict(entry.get("scalars", {})), tuple(entry["shape"]),
                                   np.dtype(entry["dtype"]), np)
            if MASTER in st and st[MASTER].dtype != np.float32:
                raise StatesFormatError(f"key {key!r}: the master copy must be float32")
        if config is not None:
            opt.reconfigure(config)
        opt.num_update = int(meta.get("num_update", opt.num_update))
        load = getattr(opt, "load_globals", None)
        if load is not None:
            load(meta.get("globals", {}))
        else:
            opt.globals = dict(meta.get("globals", {}))
        self.states = states
