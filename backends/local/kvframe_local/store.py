"""Store 'local': values live in host memory; pushes are summed on the CPU and the updater runs there."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from kvframe.arrays import RowSparseArray, array_module
from kvframe.backend import COMPLETED, Handle, InProcessUpdates, StoreBackend
from kvframe.config import StoreConfig
from kvframe.errors import NotSupportedError
from kvframe.reduce import Reducer, merge
from kvframe.sumkeys import is_sum_key


class LocalConfig(StoreConfig):
    type: Literal["local"] = "local"
    reduce_threads: int | None = Field(None, ge=1, le=256, description="threads summing large arrays (default: "
                                                                        "min(4, CPUs))")
    bigarray_bound: int = Field(1_000_000, ge=1, description="arrays of at least this many elements are "
                                                             "reduced over the thread pool")


def group_by_key(keys: list, values: list[list]) -> dict:
    """A key repeated in one call has its values summed: gather them per key, in order."""
    grouped: dict = {}
    for k, vals in zip(keys, values):
        grouped.setdefault(k, []).extend(vals)
    return grouped


def unique_rows(row_ids: Any) -> Any:
    xp = array_module(row_ids)
    return xp.unique(xp.asarray(row_ids).astype(np.int64, copy=False))


class LocalStore(InProcessUpdates, StoreBackend):
    capabilities = frozenset({"optimizer", "row_sparse"})

    def __init__(self, config: LocalConfig):
        super().__init__(config)
        self._reducer = Reducer(config.reduce_threads, config.bigarray_bound)
        self._data: dict = {}
        self._merge_buf: dict = {}

    # where a key's value lives; the device store overrides these
    def _place(self, key: Any, value: Any) -> Any:
        arr = value.todense() if isinstance(value, RowSparseArray) else value
        return np.array(arr.get() if array_module(arr) is not np else arr, copy=True, order="C")

    def init(self, keys: list, values: list) -> None:
        for k, v in zip(keys, values):
            self._data[k] = self._place(k, v)

    def _merged(self, key: Any, vals: list) -> Any:
        """The sum of a key's pushed values, in a reused buffer beside the stored value."""
        stored = self._data[key]
        if len(vals) == 1:
            v = vals[0]
            if isinstance(v, RowSparseArray) or array_module(v) is array_module(stored):
                return v
        buf = self._merge_buf.get(key)
        if buf is None and not all(isinstance(v, RowSparseArray) for v in vals):
            buf = self._merge_buf[key] = np.empty_like(stored)
        moved = [v if isinstance(v, RowSparseArray) or array_module(v) is np else v.get() for v in vals]
        return merge(self._reducer, moved, buf)

    def _apply(self, key: Any, merged: Any) -> None:
        stored = self._data[key]
        if self._updater is not None:
            self._updater(key, merged, stored)
        elif isinstance(merged, RowSparseArray):
            stored[...] = 0
            stored[merged.indices] = merged.data
        else:
            self._reducer.copy_into(stored, merged)

    def push(self, keys: list, values: list[list], priority: int = 0) -> None:
        if len(keys) == 1:
            self._push_key(keys[0], values[0])
            return
        grouped = group_by_key(keys, values)
        if self._checked_updates(grouped):
            self._staged_push(grouped)
        else:
            for k, vals in grouped.items():
                self._push_key(k, vals)

    # a push of several keys is all or nothing --------------------------------------------------
    def _grad_for_check(self, key: Any, vals: list) -> Any:
        """What the updater will be given, as far as a check needs: a sum of row-sparse values
        stays where they are; anything else is merged into a dense array beside the stored one."""
        if all(isinstance(v, RowSparseArray) for v in vals):
            return vals[0]
        return self._data[key]

    def _checked_updates(self, grouped: dict) -> bool:
        """Let the updater refuse any key (an optimizer refusing a dtype or a shape) before any key
        changes. Returns True when it cannot say beforehand (an updater of the user's own), so the
        push must be staged."""
        if self._updater is None or len(grouped) < 2:
            return False
        check = getattr(self._updater, "check", None)
        if check is None:
            return True
        for k, vals in grouped.items():
            if not is_sum_key(k):  # summed, never given to the optimizer
                check(k, self._grad_for_check(k, vals), self._data[k])
        return False

    def _copy_value(self, value: Any) -> Any:
        return value.copy()

    def _staged_push(self, grouped: dict) -> None:
        """Push every key into a copy of its value, then put the copies in place: if the updater
        raises on one key, every key keeps its value (an updater's own state is its business)."""
        saved = {k: self._data[k] for k in grouped}
        try:
            for k in grouped:
                self._data[k] = self._copy_value(saved[k])
            for k, vals in grouped.items():
                self._push_key(k, vals)
        except BaseException:
            self._data.update(saved)
            raise

    def _push_key(self, key: Any, vals: list) -> None:
        if self._updater is None and all(type(v) is np.ndarray for v in vals):
            self._reducer.sum_into(self._data[key], vals)  # assign the sum straight into the store
        else:
            self._apply(key, self._merged(key, vals))

    def pull(self, keys: list, outs: list[list], priority: int = 0, ignore_sparse: bool = True) -> Handle:
        for k, os_ in zip(keys, outs):
            stored = self._data[k]
            for o in os_:
                if isinstance(o, RowSparseArray):  # ignore_sparse=False: every row
                    o.data, o.indices = stored.copy(), np.arange(stored.shape[0], dtype=np.int64)
                else:
                    self._reducer.copy_into(o, stored)
        return COMPLETED

    def pushpull(self, keys: list, values: list[list], outs: list[list], priority: int = 0) -> Handle:
        # every reduction finishes before any output is written: outs may alias the inputs
        self.push(keys, values, priority)
        return self.pull(keys, outs, priority)

    def row_sparse_pull(self, keys: list, outs: list[list], row_ids: list[list], priority: int = 0) -> Handle:
        for k, os_, ids in zip(keys, outs, row_ids):
            stored = self._data[k]
            cache: dict[int, tuple] = {}
            for o, r in zip(os_, ids):
                got = cache.get(id(r))
                if got is None:
                    rows = unique_rows(r)
                    got = cache[id(r)] = (rows, stored[rows])
                rows, data = got
                o.data = data.copy() if len(os_) > 1 else data
                o.indices = rows.copy() if len(os_) > 1 else rows
        return COMPLETED

    def set_gradient_compression(self, compressor: Any) -> None:
        raise NotSupportedError("gradient compression is not supported by store 'local' (as in MXNet): use "
                                "store 'device' or a dist store")

    def close(self) -> None:
        self._reducer.close()
