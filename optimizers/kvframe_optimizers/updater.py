"""The updater a store calls on push, and its checkpoints.

``updater(key, grad, weight)`` creates the key's states on first use and runs one optimizer step.
``get_states()`` writes an ``.npz`` (numpy's zip of ``.npy`` files, loaded with
``allow_pickle=False``): every state array, plus a JSON document (entry ``__meta__``) with the
optimizer type, update counts, per-key scalars, the shape and dtype each key's states were made
for, and (``dump_optimizer=True``) the optimizer config.  Nothing is ever pickled.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from kvframe.arrays import RowSparseArray, array_module
from kvframe.errors import ConfigError, DTypeMismatchError, ShapeMismatchError
from kvframe_optimizers.base import MASTER, KeyState, Optimizer

FORMAT = "kvframe-optimizer-states"
VERSION = 1
META = "__meta__"
ALIASES = {"ccsgd": "sgd"}  # optimizers whose states are interchangeable


class StatesFormatError(ValueError):
    """The bytes are not optimizer states kvframe can load into this optimizer."""


def _family(name: str) -> str:
    return ALIASES.get(name, name)


def _to_numpy(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


def read_states(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse a states file: (meta, arrays).  Raises StatesFormatError on anything unexpected."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if META not in z.files:
                raise StatesFormatError("not kvframe optimizer states: the file has no __meta__ entry")
            meta = json.loads(bytes(z[META]).decode("utf-8"))
            arrays = {n: z[n] for n in z.files if n != META}
    except StatesFormatError:
        raise
    except Exception as exc:  # whatever numpy, zipfile or json raise on bytes that are not ours
        raise StatesFormatError(f"not kvframe optimizer states (an .npz with arrays and JSON): "
                                f"{type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StatesFormatError(f"not kvframe optimizer states: format is {meta.get('format')!r}, "
                                f"expected {FORMAT!r}" if isinstance(meta, dict) else "not kvframe optimizer states")
    if meta.get("version") != VERSION:
        raise StatesFormatError(f"optimizer states of format version {meta.get('version')!r}; this kvframe reads "
                                f"version {VERSION}")
    return meta, arrays


def _check_family(optimizer: Optimizer, meta: dict) -> None:
    mine, theirs = optimizer.config.type, meta.get("optimizer")
    if _family(str(theirs)) != _family(mine):
        raise StatesFormatError(f"these optimizer states were written by optimizer {theirs!r}; the optimizer set "
                                f"now is {mine!r}: set_optimizer({theirs!r}, ...) first, or load matching states")


def saved_config(optimizer: Optimizer, meta: dict) -> Any:
    """The config dumped with the states (validated by the optimizer's model), or None."""
    _check_family(optimizer, meta)
    if "config" not in meta:
        return None
    try:
        return type(optimizer.config).model_validate({**meta["config"], "type": optimizer.config.type})
    except Exception as exc:  # pydantic.ValidationError
        raise ConfigError(f"the optimizer config saved with the states is invalid: {exc}") from None


def check_states_for(optimizer: Optimizer, meta: dict, arrays: Mapping[str, np.ndarray],
                     weights: Mapping[Hashable, tuple] | None = None) -> None:
    """Refuse states written by another optimizer, or for other shapes than ``weights``
    (key -> (shape, dtype)) or than the optimizer's layout (under the dumped config, if any)."""
    config = saved_config(optimizer, meta)
    if config is not None:  # the states will come with this config: check the layout it gives
        optimizer = type(optimizer)(config)
    mine = optimizer.config.type
    for entry in meta.get("keys", []):
        key = entry["key"]
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        if weights is not None and key in weights:
            wshape, wdtype = weights[key]
            if tuple(wshape) != shape:
                raise ShapeMismatchError(f"key {key!r}: the saved optimizer states are for a weight of shape {shape}, "
                                         f"but the key holds shape {tuple(wshape)}")
            if np.dtype(wdtype) != dtype:
                raise DTypeMismatchError(f"key {key!r}: the saved optimizer states are for dtype {dtype}, but the "
                                         f"key holds dtype {np.dtype(wdtype)}")
        expected = optimizer.state_shapes(shape, dtype)
        names = entry.get("arrays", {})
        if set(names) != set(expected):
            raise StatesFormatError(f"key {key!r}: the saved states hold {sorted(names)}, but optimizer {mine!r} with "
                                    f"this config keeps {sorted(expected)} (were they saved with another momentum or "
                                    f"multi_precision setting?)")
        for name, fname in names.items():
            arr = arrays.get(fname)
            if arr is None:
                raise StatesFormatError(f"key {key!r}: state {name!r} is missing from the file")
            eshape, edtype = expected[name]
            if tuple(arr.shape) != tuple(eshape) or arr.dtype != edtype:
                raise ShapeMismatchError(f"key {key!r}: saved state {name!r} has shape {tuple(arr.shape)} and dtype "
                                         f"{arr.dtype}; expected shape {tuple(eshape)} and dtype {edtype}")


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
        meta = {"format": FORMAT, "version": VERSION, "optimizer": opt.config.type, "num_update": opt.num_update,
                "globals": opt.globals, "keys": keys}
        if dump_optimizer:
            meta["config"] = opt.config.model_dump(mode="json")
        buf = io.BytesIO()
        np.savez(buf, **{META: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}, **entries)
        return buf.getvalue()

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
