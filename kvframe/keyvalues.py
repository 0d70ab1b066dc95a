"""The values a store holds in this process, and what every such store does with them.

A store that keeps its values in this process (``local``, ``device``; a plugin's own) composes one
:class:`KeyValues` instead of inheriting another store's private parts.  It gives:

* the reduction of the pushed copies (:class:`kvframe.reduce.Reducer`, on the shared thread pool),
* the step every push ends in: run the updater on the sum, or assign the sum,
* pulls and row-sparse pulls from the held values,
* pushes of several keys that are all or nothing.

Where a value lives (host memory, a GPU) is the store's business: it moves a merged value next to
the held one before calling :meth:`KeyValues.apply`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pydantic

from kvframe import timeline
from kvframe.arrays import RowSparseArray, array_module
from kvframe.config import StoreConfig
from kvframe.reduce import Reducer, merge
from kvframe.sumkeys import is_sum_key


class InProcessStoreConfig(StoreConfig):
    """Options of every store that reduces in this process."""

    reduce_threads: int | None = pydantic.Field(None, ge=1, le=256, description="threads summing large arrays "
                                                "(default: KVFRAME_THREADS, else min(4, CPUs))")
    bigarray_bound: int = pydantic.Field(1_000_000, ge=1, description="arrays of at least this many elements are "
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


def on_device_of(value: Any) -> contextlib.AbstractContextManager:
    """The device of a GPU array as the current device (cupy), else nothing to do."""
    device: Any = getattr(value, "device", None)
    return device if hasattr(device, "__enter__") else contextlib.nullcontext()


class KeyValues(dict):
    """The held values by key (a dict: reading one costs what a dict lookup does), with the updater
    a push runs on them (None: the sum is assigned)."""

    def __init__(self, reducer: Reducer):
        super().__init__()
        self.reducer = reducer
        self.updater: Any = None
        self._merge_buf: dict = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        """Hold ``value`` (the store's own copy) for ``key``; a merge buffer of the old one is dropped."""
        super().__setitem__(key, value)
        self._merge_buf.pop(key, None)

    def merge_buffer(self, key: Any) -> Any:
        """A reused buffer shaped like the held value, where it lives (host or GPU)."""
        buf = self._merge_buf.get(key)
        if buf is None:
            held = self[key]
            with on_device_of(held):
                buf = self._merge_buf[key] = array_module(held).empty_like(held)
        return buf

    # push -------------------------------------------------------------------------------------
    def merged_on_host(self, key: Any, vals: list) -> Any:
        """The sum of host values (numpy or row-sparse): the value itself when there is one,
        else summed into the merge buffer (all row-sparse: a row-sparse union)."""
        if len(vals) == 1:
            return vals[0]
        dense_needed = not all(isinstance(v, RowSparseArray) for v in vals)
        return merge(self.reducer, vals, self.merge_buffer(key) if dense_needed else None)

    def push_on_host(self, key: Any, vals: list) -> None:
        """Sum host values and update (or assign into) the held host value."""
        if timeline.enabled:  # KVFRAME_TIMELINE: the phases of this push
            with timeline.span("reduce", key=key, nbytes=timeline.nbytes(vals), copies=len(vals)):
                merged = self.merged_on_host(key, vals)
            with timeline.span("update" if self.updater is not None else "assign", key=key):
                self.apply(key, merged)
        elif self.updater is None and (len(vals) == 1 and type(vals[0]) is np.ndarray
                                       or all(type(v) is np.ndarray for v in vals)):
            self.reducer.sum_into(self[key], vals)  # the sum goes straight into the held value
        else:
            self.apply(key, self.merged_on_host(key, vals))

    def apply(self, key: Any, merged: Any) -> None:
        """The step every push ends in: run the updater on ``merged`` (on the held value's device),
        or assign it.  ``merged`` lives where the held value does."""
        held = self[key]
        with on_device_of(held):
            if self.updater is not None:
                self.updater(key, merged, held)
            elif isinstance(merged, RowSparseArray):
                held[...] = 0
                held[merged.indices] = merged.data
            else:
                self.reducer.copy_into(held, merged)

    def adopt(self, key: Any, array: Any) -> bool:
        """Hold ``array`` itself as the key's value when it can stand in for the held one (a
        writeable, C-contiguous numpy array of its shape and dtype, and no updater to run):
        a donated push with no copy.  False when it cannot; the caller then pushes as usual."""
        held = self[key]
        if self.updater is not None or type(array) is not np.ndarray or array is held \
                or not (array.flags.c_contiguous and array.flags.writeable) \
                or array.shape != held.shape or array.dtype != held.dtype:
            return False
        self[key] = array
        return True

    # pull -------------------------------------------------------------------------------------
    def pull_on_host(self, key: Any, outs: list) -> None:
        held = self[key]
        for o in outs:
            if isinstance(o, RowSparseArray):  # ignore_sparse=False: every row
                o.data, o.indices = held.copy(), np.arange(held.shape[0], dtype=np.int64)
            else:
                self.reducer.copy_into(o, held)

    def row_sparse_pull(self, key: Any, outs: list, row_ids: list) -> None:
        held = self[key]
        cache: dict[int, tuple] = {}  # one id array shared by several outputs is looked up once
        for o, r in zip(outs, row_ids):
            got = cache.get(id(r))
            if got is None:
                rows = unique_rows(r)
                got = cache[id(r)] = (rows, held[rows])
            rows, data = got
            o.data = data.copy() if len(outs) > 1 else data
            o.indices = rows.copy() if len(outs) > 1 else rows

    # a push of several keys is all or nothing -------------------------------------------------
    def needs_staging(self, grouped: dict, grad_for_check: Callable[[Any, list], Any]) -> bool:
        """Let the updater refuse any key (an optimizer refusing a dtype or a shape) before any key
        changes.  True when it cannot say beforehand (an updater of the user's own): the push must
        then be staged (:meth:`staged`)."""
        if self.updater is None or len(grouped) < 2:
            return False
        check = getattr(self.updater, "check", None)
        if check is None:
            return True
        for k, vals in grouped.items():
            if not is_sum_key(k):  # summed, never given to the optimizer
                check(k, grad_for_check(k, vals), self[k])
        return False

    @contextlib.contextmanager
    def staged(self, keys: Any, copy_value: Callable[[Any], Any]) -> Iterator[None]:
        """Work on copies of the keys' values: if the block raises, every key keeps its value (an
        updater's own state is its business)."""
        saved = {k: self[k] for k in keys}
        try:
            for k in saved:
                self[k] = copy_value(saved[k])
            yield
        except BaseException:
            dict.update(self, saved)
            raise
