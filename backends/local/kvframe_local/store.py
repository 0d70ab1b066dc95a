"""Store 'local': values live in host memory; pushes are summed on the CPU and the updater runs there."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from kvframe.arrays import Array, RowSparseArray, to_host
from kvframe.backend import COMPLETED, Handle, InProcessUpdates, Keys, PerKey, StoreBackend
from kvframe.errors import NotSupportedError
from kvframe.keyvalues import InProcessStoreConfig, KeyValues, group_by_key
from kvframe.reduce import Reducer


class LocalConfig(InProcessStoreConfig):
    type: Literal["local"] = "local"


class LocalStore(InProcessUpdates, StoreBackend):
    capabilities = frozenset({"optimizer", "row_sparse"})

    def __init__(self, config: LocalConfig):
        super().__init__(config)
        self._values = KeyValues(Reducer(config.reduce_threads, config.bigarray_bound))

    def set_updater(self, updater: Any) -> None:
        super().set_updater(updater)
        self._values.updater = updater

    def init(self, keys: Keys, values: list[Array]) -> None:
        for k, v in zip(keys, values):
            arr = to_host(v.todense() if isinstance(v, RowSparseArray) else v)
            self._values[k] = np.array(arr, copy=True, order="C")

    def push(self, keys: Keys, values: PerKey, priority: int = 0) -> None:
        if len(keys) == 1 and len(values[0]) == 1 and type(values[0][0]) is np.ndarray:  # the common case, lean
            self._values.push_on_host(keys[0], values[0])
            return
        grouped = {keys[0]: values[0]} if len(keys) == 1 else group_by_key(keys, values)
        grouped = {k: [to_host(v) for v in vals] for k, vals in grouped.items()}
        if self._values.needs_staging(grouped, self._grad_for_check):
            with self._values.staged(grouped, np.copy):
                self._push_all(grouped)
        else:
            self._push_all(grouped)

    def push_donated(self, keys: Keys, values: PerKey, priority: int = 0) -> None:
        # one array for a key, no updater: it becomes the key's value (no copy); anything else is a push
        if len(set(keys)) == len(keys) and all(len(vals) == 1 for vals in values) and self._values.updater is None:
            rest = [(k, vals) for k, vals in zip(keys, values) if not self._values.adopt(k, vals[0])]
            if rest:
                self.push([k for k, _ in rest], [vals for _, vals in rest], priority)
            return
        self.push(keys, values, priority)

    def _push_all(self, grouped: dict) -> None:
        for k, vals in grouped.items():
            self._values.push_on_host(k, vals)

    def _grad_for_check(self, key: Any, vals: list) -> Any:
        """What the updater will be given, as far as a check needs: a sum of row-sparse values
        stays row-sparse; anything else is merged into a dense array beside the held one."""
        return vals[0] if all(isinstance(v, RowSparseArray) for v in vals) else self._values[key]

    def pull(self, keys: Keys, outs: PerKey, priority: int = 0, ignore_sparse: bool = True) -> Handle:
        for k, os_ in zip(keys, outs):
            self._values.pull_on_host(k, os_)
        return COMPLETED

    def row_sparse_pull(self, keys: Keys, outs: PerKey, row_ids: PerKey, priority: int = 0) -> Handle:
        for k, os_, ids in zip(keys, outs, row_ids):
            self._values.row_sparse_pull(k, os_, ids)
        return COMPLETED

    def set_gradient_compression(self, compressor: Any) -> None:
        raise NotSupportedError("gradient compression is not supported by store 'local' (as in MXNet): use "
                                "store 'device' or a dist store")
