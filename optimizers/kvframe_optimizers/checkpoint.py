"""The optimizer checkpoint format, read and checked without pickle.

A checkpoint is an ``.npz`` (numpy's zip of ``.npy`` files, loaded with ``allow_pickle=False``):
every state array, plus a JSON document (entry ``__meta__``) with the optimizer type, update
counts, per-key scalars, the shape and dtype each key's states were made for, and
(``dump_optimizer=True``) the optimizer config.  Nothing is ever pickled.
"""

from __future__ import annotations

import io
import json
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from kvframe.errors import ConfigError, DTypeMismatchError, ShapeMismatchError

if TYPE_CHECKING:
    from kvframe_optimizers.base import Optimizer

FORMAT = "kvframe-optimizer-states"
VERSION = 1
META = "__meta__"
ALIASES = {"ccsgd": "sgd"}  # optimizers whose states are interchangeable


class StatesFormatError(ValueError):
    """The bytes are not optimizer states kvframe can load into this optimizer."""


def _family(name: str) -> str:
    return ALIASES.get(name, name)


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


def write_states(meta: dict, arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of a checkpoint: ``meta`` (given its format and version here) and the arrays."""
    meta = {"format": FORMAT, "version": VERSION, **meta}
    buf = io.BytesIO()
    entries: dict[str, Any] = {META: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8), **arrays}
    np.savez(buf, **entries)
    return buf.getvalue()
