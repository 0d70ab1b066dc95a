"""The ``KVStore`` front every user calls (the contract a store plugin implements is in
:mod:`kvframe.backend`).

The front checks and normalises every argument once, so every store type behaves the same and
refuses bad input before anything changes: keys become a list, values a list (one per key) of
lists (one array per device).  A backend only sees normalised, checked lists.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvframe import plugins
from kvframe import timeline as _timeline
from kvframe.arrays import RowSparseArray, as_native, describe
from kvframe.backend import COMPLETED, Handle, StoreBackend, check_summable
from kvframe.configfile import KVFrameConfig, load_config
from kvframe.errors import (
    DTypeMismatchError,
    DuplicateInitError,
    KeyNotInitializedError,
    MixedKeyTypesError,
    NotSupportedError,
    ShapeMismatchError,
)
from kvframe.log import configure as _configure_logging
from kvframe.protocols import Optimizer
from kvframe.sumkeys import SumOnlyOptimizer, sum_only_updater


@dataclass(frozen=True)
class KeyMeta:
    shape: tuple[int, ...]
    dtype: np.dtype
    stype: str  # 'default' or 'row_sparse'


def _check_key(key: Any) -> int | str:
    if isinstance(key, str):
        return key if type(key) is str else str(key)  # numpy's str_ (keys from an array of names) is a str
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return int(key)
    raise TypeError(f"a key must be an int or a str; got {key!r} of type {type(key).__name__}")


class KVStore:
    """A key-value store for data-parallel training, with Apache MXNet's KVStore API."""

    def __init__(self, backend: StoreBackend, type_name: str):
        _configure_logging()  # KVFRAME_LOG_LEVEL (a bad value is refused here)
        if _timeline.enabled:  # a backend that knows its role named the process already
            _timeline.name_process("worker", backend.rank, override=False)
        self._backend = backend
        self._type = type_name
        self._meta: dict[Hashable, KeyMeta] = {}
        self._key_type: type | None = None
        self._optimizer: Any = None
        self._updater: Any = None  # the user's own, from set_updater
        self._compression: Any = None
        self._closed = False

    # identity -------------------------------------------------------------------------------
    @property
    def type(self) -> str:
        return self._type

    @property
    def rank(self) -> int:
        return self._backend.rank

    @property
    def num_workers(self) -> int:
        return self._backend.num_workers

    @property
    def backend(self) -> StoreBackend:
        return self._backend

    OPTIMIZER = "optimizer"

    def is_capable(self, capability: str) -> bool:
        """Whether this store can do ``capability`` ('optimizer' is the only one MXNet knew)."""
        known = {"optimizer", "compression", "row_sparse"}
        if not isinstance(capability, str) or capability.lower() not in known:
            raise ValueError(f"unknown capability {capability!r}; known: {sorted(known)}")
        return capability.lower() in self._backend.capabilities

    def keys(self) -> list:
        """The initialised keys, in init order."""
        return list(self._meta)

    # normalisation --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise NotSupportedError(f"this {self._type!r} store is closed: create a new one with kvframe.create()")

    def _keys(self, key: Any) -> tuple[list, bool]:
        self._check_open()
        if isinstance(key, (list, tuple)):
            if not key:
                raise ValueError("the key list is empty; give at least one key")
            keys = [_check_key(k) for k in key]
            single = False
        else:
            keys = [_check_key(key)]
            single = True
        kinds = {type(k) for k in keys}
        if len(kinds) > 1 or (self._key_type is not None and kinds != {self._key_type}):
            have = f"this store uses {self._key_type.__name__} keys" if self._key_type else "one list"
            raise MixedKeyTypesError(f"mixed key types are not allowed: {have}, got keys {keys!r}")
        return keys, single

    @staticmethod
    def _array(x: Any, key: Any, what: str) -> Any:
        try:
            arr = as_native(x)
        except TypeError as exc:
            raise TypeError(f"key {key!r}: {what}: {exc}") from exc
        if arr is None:
            got = f"the numpy scalar {x!r} (make it an array: np.asarray(x))" if isinstance(x, np.generic) \
                else type(x).__name__
            raise TypeError(f"key {key!r}: {what} must be an array (numpy, cupy, kvframe.RowSparseArray or "
                            f"anything with __dlpack__); got {got}")
        return arr

    def _per_key(self, keys: list, single: bool, value: Any, what: str) -> list[list]:
        if single:
            return [self._devices(value, keys[0], what)]
        if not isinstance(value, (list, tuple)) or len(value) != len(keys):
            n = len(value) if isinstance(value, (list, tuple)) else f"one {type(value).__name__}"
            raise ValueError(f"{len(keys)} keys {keys!r} need {len(keys)} {what}s (one per key, each an array "
                             f"or a list of per-device arrays); got {n}")
        return [self._devices(v, k, what) for k, v in zip(keys, value)]

    def _devices(self, value: Any, key: Any, what: str) -> list:
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"key {key!r}: the list of {what}s is empty")
            return [self._array(v, key, what) for v in value]
        return [self._array(value, key, what)]

    def _meta_of(self, key: Any) -> KeyMeta:
        meta = self._meta.get(key)
        if meta is None:
            raise KeyNotInitializedError(f"key {key!r} has not been initialised; call init({key!r}, value) first")
        return meta

    def _check_values(self, keys: list, values: list[list], what: str, dense_only: bool = False) -> None:
        for k, vals in zip(keys, values):
            meta = self._meta_of(k)
            for i, v in enumerate(vals):
                where = f"key {k!r}: {what}" + (f" {i}" if len(vals) > 1 else "")
                if dense_only and isinstance(v, RowSparseArray):
                    raise TypeError(f"{where} is a RowSparseArray; expected a dense array here")
                if tuple(v.shape) != meta.shape:
                    raise ShapeMismatchError(f"{where} has shape {tuple(v.shape)}, but the key was initialised "
                                             f"with shape {meta.shape}")
                if v.dtype != meta.dtype:
                    raise DTypeMismatchError(f"{where} has dtype {v.dtype}, but the key was initialised with "
                                             f"dtype {meta.dtype}")

    @staticmethod
    def _check_writable(keys: list, outs: list[list], what: str) -> None:
        """Outputs are written into: refuse read-only ones (numpy's writeable flag) before anything
        changes, naming the key, instead of failing half-way with numpy's bare message."""
        for k, os_ in zip(keys, outs):
            for i, o in enumerate(os_):
                flags = getattr(o, "flags", None)
                if flags is not None and getattr(flags, "writeable", True) is False:
                    where = f"key {k!r}: {what}" + (f" {i}" if len(os_) > 1 else "")
                    raise ValueError(f"{where} is read-only ({describe(o)} with flags.writeable=False); the "
                                     "store writes the result into it: give a writable array")

    # data -----------------------------------------------------------------------------------
    def init(self, key: Any, value: Any) -> None:
        """Initialise one key or a list of keys. In distributed stores rank 0's value wins."""
        if _timeline.enabled and _timeline.tracing():  # KVFRAME_TIMELINE: one span per key
            _timeline.trace_op("init", key, value, self.init, key, value)
            return
        keys, single = self._keys(key)
        values = self._per_key(keys, single, value, "value")
        seen: set = set()
        for k, vals in zip(keys, values):
            if k in self._meta or k in seen:
                raise DuplicateInitError(f"duplicate init of key {k!r}")
            if len(vals) != 1:
                raise ValueError(f"key {k!r}: init takes one array per key, got {len(vals)}")
            check_summable(k, vals[0].dtype)
            seen.add(k)
        self._backend.init(keys, [v[0] for v in values])
        self._remember(keys, values)

    def _remember(self, keys: list, values: list[list]) -> None:
        for k, vals in zip(keys, values):
            v = vals[0]
            stype = "row_sparse" if isinstance(v, RowSparseArray) else "default"
            self._meta[k] = KeyMeta(tuple(v.shape), np.dtype(v.dtype), stype)
        if self._key_type is None:
            self._key_type = type(keys[0])

    def push(self, key: Any, value: Any, priority: int = 0, donate: bool = False) -> None:
        """Push values (a list per key is summed). Returns once the inputs may be reused.

        ``donate=True`` hands the pushed arrays over to the store, as JAX's buffer donation: a store
        that can (``local``, for one numpy array per key and no updater) keeps the array itself as
        the key's value instead of copying it, which saves one copy per push.  **Hazard:** the
        array then *is* the store's value: do not read or write it after the push (not even to
        push it again; pull into another array).  Other stores copy, as without ``donate``."""
        if _timeline.enabled and _timeline.tracing():  # KVFRAME_TIMELINE: one span per key
            _timeline.trace_op("push", key, value, self.push, key, value, priority, donate=donate)
            return
        if type(value) is np.ndarray and (type(key) is int or type(key) is str) and not self._closed:  # lean case
            meta = self._meta.get(key)
            if meta is not None and value.shape == meta.shape and value.dtype == meta.dtype:
                if donate:
                    self._backend.push_donated([key], [[value]], priority)
                else:
                    self._backend.push([key], [[value]], priority)
                return
        keys, single = self._keys(key)
        values = self._per_key(keys, single, value, "value")
        self._check_values(keys, values, "pushed value")
        if donate:
            self._backend.push_donated(keys, values, priority)
        else:
            self._backend.push(keys, values, priority)

    def _outs(self, key: Any, out: Any, what: str = "out") -> tuple[list, list[list]]:
        if out is None:
            raise ValueError("out is required: give the array(s) to write the pulled values into")
        keys, single = self._keys(key)
        outs = self._per_key(keys, single, out, what)
        return keys, outs

    def pull(self, key: Any, out: Any = None, priority: int = 0, ignore_sparse: bool = True,
             wait: bool = True) -> Handle:
        """Write each key's value into ``out``. With ``wait=False`` returns a handle to wait on."""
        if _timeline.enabled and _timeline.tracing():  # KVFRAME_TIMELINE: one span per key
            return _timeline.trace_op("pull", key, out, self.pull, key, out, priority, ignore_sparse, wait=wait)
        if type(out) is np.ndarray and (type(key) is int or type(key) is str) and not self._closed:  # lean case
            meta = self._meta.get(key)
            if meta is not None and out.shape == meta.shape and out.dtype == meta.dtype and out.flags.writeable:
                handle = self._backend.pull([key], [[out]], priority, ignore_sparse)
                if wait and handle is not COMPLETED:
                    handle.wait()
                return handle
        keys, outs = self._outs(key, out)
        dense_keys, dense_outs = [], []
        for k, os_ in zip(keys, outs):
            meta = self._meta_of(k)
            keep = []
            for o in os_:
                if isinstance(o, RowSparseArray):
                    if ignore_sparse:
                        warnings.warn(f"key {k!r}: pull() skips RowSparseArray outputs; use row_sparse_pull, or "
                                      "pass ignore_sparse=False to pull every row", stacklevel=2)
                        continue
                    if o.shape != meta.shape:
                        raise ShapeMismatchError(f"key {k!r}: out has shape {o.shape}, expected {meta.shape}")
                    if o.dtype != meta.dtype:
                        raise DTypeMismatchError(f"key {k!r}: out has dtype {o.dtype}, but the key was initialised "
                                                 f"with dtype {meta.dtype}")
                keep.append(o)
            if keep:
                dense_keys.append(k)
                dense_outs.append(keep)
        self._check_values(dense_keys, [[o for o in os_ if not isinstance(o, RowSparseArray)] for os_ in dense_outs],
                           "out")
        self._check_writable(dense_keys, dense_outs, "out")
        if not dense_keys:
            return COMPLETED
        handle = self._backend.pull(dense_keys, dense_outs, priority, ignore_sparse)
        if wait:
            handle.wait()
        return handle

    def pushpull(self, key: Any, value: Any, out: Any = None, priority: int = 0, wait: bool = True) -> Handle:
        """Push then pull in one step; ``out=None`` writes the result back into ``value``.
        With a key list every reduction finishes before any output is written."""
        if _timeline.enabled and _timeline.tracing():  # KVFRAME_TIMELINE: one span per key
            return _timeline.trace_op("pushpull", key, value, self.pushpull, key, value, out, priority, wait=wait)
        keys, single = self._keys(key)
        values = self._per_key(keys, single, value, "value")
        self._check_values(keys, values, "pushed value")
        if out is None:
            outs = values
            self._check_values(keys, outs, "value (written in place)", dense_only=True)
            self._check_writable(keys, outs, "value (written in place)")
        else:
            _, outs = self._outs(key, out)
            self._check_values(keys, outs, "out", dense_only=True)
            self._check_writable(keys, outs, "out")
        handle = self._backend.pushpull(keys, values, outs, priority)
        if wait:
            handle.wait()
        return handle

    def broadcast(self, key: Any, value: Any, out: Any, priority: int = 0) -> None:
        """Initialise keys with ``value`` (rank 0's, in distributed stores) and pull into ``out``."""
        if _timeline.enabled and _timeline.tracing():  # KVFRAME_TIMELINE: one span per key
            _timeline.trace_op("broadcast", key, value, self.broadcast, key, value, out, priority)
            return
        keys, single = self._keys(key)
        values = self._per_key(keys, single, value, "value")
        _, outs = self._outs(key, out)
        seen: set = set()
        for k, vals, os_ in zip(keys, values, outs):
            if k in self._meta or k in seen:
                raise DuplicateInitError(f"duplicate init of key {k!r} (broadcast initialises the key)")
            for v in vals:
                check_summable(k, v.dtype)
            seen.add(k)
            for o in os_:
                if tuple(o.shape) != tuple(vals[0].shape):
                    raise ShapeMismatchError(f"key {k!r}: out is {describe(o)}, but the value is {describe(vals[0])}")
                if o.dtype != vals[0].dtype:
                    raise DTypeMismatchError(f"key {k!r}: out is {describe(o)}, but the value is {describe(vals[0])}")
        self._check_writable(keys, outs, "out")
        self._backend.broadcast(keys, values, outs, priority).wait()
        self._remember(keys, values)

    def row_sparse_pull(self, key: Any, out: Any = None, priority: int = 0, row_ids: Any = None) -> None:
        """Pull only the rows in ``row_ids`` into RowSparseArray outputs (one id array per output,
        or one shared by all outputs of a key).  An id array of any shape means the rows it holds
        (``[[0, 1], [3, 3]]`` is rows 0, 1 and 3), as in MXNet."""
        if _timeline.enabled and _timeline.tracing():  # KVFRAME_TIMELINE: one span per key
            _timeline.trace_op("row_sparse_pull", key, out, self.row_sparse_pull, key, out, priority, row_ids=row_ids)
            return
        if row_ids is None:
            raise ValueError("row_sparse_pull needs row_ids")
        keys, single = self._keys(key)
        outs = self._per_key(keys, single, out, "out")
        if single:
            ids = [row_ids if isinstance(row_ids, (list, tuple)) else [row_ids]]
        else:
            if not isinstance(row_ids, (list, tuple)) or len(row_ids) != len(keys):
                raise ValueError(f"{len(keys)} keys need {len(keys)} row_ids entries; got "
                                 f"{len(row_ids) if isinstance(row_ids, (list, tuple)) else 'one array'}")
            ids = [r if isinstance(r, (list, tuple)) else [r] for r in row_ids]
        norm_ids = []
        for k, os_, rs in zip(keys, outs, ids):
            meta = self._meta_of(k)
            native = []
            for r in rs:
                arr = as_native(r)
                if arr is None or isinstance(arr, RowSparseArray):
                    hint = " (a list of row numbers? pass np.array([...]))" if isinstance(r, (int, np.integer)) else ""
                    raise TypeError(f"key {k!r}: row_ids must be arrays of row numbers, one per output or one "
                                    f"for all; got {type(r).__name__}{hint}")
                native.append(arr if arr.ndim == 1 else arr.reshape(-1))  # any shape, as MXNet: its rows
            rs = native
            if len(rs) == 1 and len(os_) > 1:
                rs = list(rs) * len(os_)
            if len(rs) != len(os_):
                raise ValueError(f"key {k!r}: {len(os_)} outputs need 1 or {len(os_)} row_ids arrays; got {len(rs)}")
            for o in os_:
                if not isinstance(o, RowSparseArray):
                    raise TypeError(f"key {k!r}: row_sparse_pull writes into kvframe.RowSparseArray outputs; got "
                                    f"{describe(o)}")
                if o.shape != meta.shape:
                    raise ShapeMismatchError(f"key {k!r}: out has shape {o.shape}, expected {meta.shape}")
                if o.dtype != meta.dtype:
                    raise DTypeMismatchError(f"key {k!r}: out has dtype {o.dtype}, but the key was initialised with "
                                             f"dtype {meta.dtype}")
            checked = []
            for r in rs:
                if r.dtype.kind not in "iuf":
                    raise TypeError(f"key {k!r}: row_ids must hold row numbers; got dtype {r.dtype}")
                if r.size and (int(r.min()) < 0 or int(r.max()) >= meta.shape[0]):
                    raise IndexError(f"key {k!r}: row_ids must lie in [0, {meta.shape[0]}); got "
                                     f"{int(r.min())}..{int(r.max())}")
                checked.append(r)
            norm_ids.append(checked)
        self._backend.row_sparse_pull(keys, outs, norm_ids, priority).wait()

    # updates --------------------------------------------------------------------------------
    def set_updater(self, updater: Any) -> None:
        """Run ``updater(key, merged_gradient, stored_weight)`` on each push instead of assigning
        (except on sum-only keys, ``kvframe.sum_key(name)``, whose pushes are always just summed)."""
        if not callable(updater):
            raise TypeError(f"an updater must be callable as updater(key, grad, weight); got {type(updater).__name__}")
        self._check_open()
        self._backend.set_updater(sum_only_updater(updater))  # sum-only keys (kvframe.sumkeys) are only summed
        self._updater, self._optimizer = updater, None

    _set_updater = set_updater

    def set_optimizer(self, optimizer: Any, **options: Any) -> None:
        """Set the optimizer: an optimizer object, a config model, a dict with 'type', or a name with
        keyword options. The config is validated before anything is applied. Sum-only keys
        (``kvframe.sum_key(name)``) are never given to it: their pushes are summed, as without one."""
        from kvframe import plugins

        self._check_open()
        if isinstance(optimizer, Optimizer) and not isinstance(optimizer, (str, dict)) and hasattr(optimizer, "config"):
            if options:
                raise TypeError("keyword options go with an optimizer name or config, not an optimizer object")
            opt = optimizer
        else:
            config = plugins.validate_plugin_config("optimizers", optimizer, "optimizer config", **options)
            opt = plugins.create("optimizers", config)
        self._backend.set_optimizer(SumOnlyOptimizer(opt))  # its updaters leave sum-only keys summed
        self._optimizer, self._updater = opt, None

    @property
    def optimizer(self) -> Any:
        return self._optimizer

    def set_gradient_compression(self, compression_params: Any, **options: Any) -> None:
        """Compress pushed gradients, e.g. ``{'type': '2bit', 'threshold': 0.5}``."""
        from kvframe import plugins

        self._check_open()
        config = plugins.validate_plugin_config("compressors", compression_params, "gradient compression config",
                                                **options)
        self._backend.set_gradient_compression(plugins.create("compressors", config))
        self._compression = config

    @property
    def gradient_compression(self) -> Any:
        return self._compression

    def save_optimizer_states(self, fname: str | os.PathLike, dump_optimizer: bool = False) -> None:
        """Write the optimizer states (arrays plus JSON, never pickle) to ``fname``."""
        self._check_open()
        data = self._backend.get_optimizer_states(dump_optimizer)
        Path(fname).write_bytes(data)

    def load_optimizer_states(self, fname: str | os.PathLike) -> None:
        """Load states written by :meth:`save_optimizer_states`. States of another optimizer, or
        for other shapes than the keys hold, are refused before anything changes."""
        self._check_open()
        # say what is missing before touching the file (a store without states raised FileNotFoundError)
        if "optimizer" not in self._backend.capabilities:
            raise NotSupportedError(f"store {self._type!r} keeps no optimizer states")
        if self._optimizer is None and not hasattr(self._updater, "set_states"):
            raise NotSupportedError("load_optimizer_states needs an optimizer: call set_optimizer first")
        data = Path(fname).read_bytes()
        check = getattr(self._optimizer, "check_states", None)
        # the optimizer can tell whether the states fit the keys here, unless the store writes its own
        # container (the dist stores gather per-server states and check them on the servers)
        if check is not None and not self._backend.own_states_format:
            check(data, {k: (m.shape, m.dtype) for k, m in self._meta.items()})
        self._backend.set_optimizer_states(data)

    # control --------------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None) -> None:
        """Wait until every worker reaches the barrier (no-op in single-process stores)."""
        self._check_open()
        self._backend.barrier(timeout)

    _barrier = barrier

    def send_command_to_servers(self, head: int, body: str) -> None:
        self._check_open()
        self._backend.send_command_to_servers(int(head), str(body))

    _send_command_to_servers = send_command_to_servers

    def close(self) -> None:
        """Release the store's threads and connections; closing twice is fine, using it after is an error."""
        self._closed = True
        self._backend.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStore(type={self._type!r}, rank={self.rank}, num_workers={self.num_workers}, keys={len(self._meta)})"


def create(name: str = "local", **options: Any) -> KVStore:
    """Create a store by name ('local', 'device', 'nccl', 'dist_sync', ... or a plugin's own),
    with the store's options as keywords (validated by its config model)."""
    from kvframe import plugins

    if not isinstance(name, str):
        raise TypeError(f"the store name must be a str; got {type(name).__name__}")
    if "type" in options:  # it would silently replace the name (create('local', type='device') made a device store)
        raise TypeError(f"create() got the store type twice: name={name!r} and type={options['type']!r}; "
                        "give the store type as the name only")
    requested = name
    name = plugins.store_name(name)
    config = plugins.validate_plugin_config("stores", {"type": name, **options}, f"options of store {name!r}")
    backend = plugins.create("stores", config)
    return KVStore(backend, requested)


def create_from_config(config: str | os.PathLike | Mapping[str, Any] | KVFrameConfig | None = None) -> KVStore:
    """Create a store from a TOML/YAML file, a dict, a loaded :class:`~kvframe.configfile.KVFrameConfig`
    or (``None``) ``$KVFRAME_CONFIG``, then set its compression and optimizer; see kvframe.configfile.
    Every section is validated before anything is created; on a failure later the store is closed."""
    cfg = config if isinstance(config, KVFrameConfig) else load_config(config)
    kv = KVStore(plugins.create("stores", cfg.store), cfg.store_name)
    try:
        if cfg.compression is not None:
            kv.set_gradient_compression(cfg.compression)
        if cfg.optimizer is not None:
            kv.set_optimizer(cfg.optimizer)
    except BaseException:
        kv.close()
        raise
    return kv


__all__: Sequence[str] = ["KVStore", "StoreBackend", "Handle", "create", "create_from_config", "KeyMeta"]
