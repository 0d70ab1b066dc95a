"""Store 'device', as MXNet's CommDevice.

* Each key's merge buffer sits on one device: when keys are first pushed after their init, the
  newly initialised keys are placed largest first, each on the device with the least load so far
  (the load being the elements already placed there).  Values are reduced there and the updater
  runs there (the stored value moves to that device).
* With gradient compression every device encodes its value with its own residual (one residual
  per key per device slot, the merging device included), the payloads travel to the merge
  device, which decodes and sums them.
* Values may be cupy arrays on several GPUs (peer copies where the hardware allows), or numpy
  arrays: a list of N numpy arrays stands for N CPU devices (slot i is device ('cpu', i)).

On numpy arrays elementwise codecs ('2bit', '1bit', 'fp16', ...) are fused with the reduction:
the merge walks cache-sized blocks, and for each block encodes every device's slice, decodes it
and adds it into the result while everything is still in cache, over a thread pool.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field

from kvframe import parallel, timeline
from kvframe.arrays import Array, RowSparseArray, array_module, to_host
from kvframe.backend import COMPLETED, Handle, InProcessUpdates, Keys, PerKey, StoreBackend
from kvframe.errors import DTypeMismatchError
from kvframe.keyvalues import InProcessStoreConfig, KeyValues, group_by_key
from kvframe.reduce import Reducer
from kvframe_device.copy import copy_into, device_id, empty_on, enable_peer_access, to_device, zeros_on


class DeviceConfig(InProcessStoreConfig):
    type: Literal["device"] = "device"
    block: int = Field(1 << 17, ge=1024, le=1 << 24, description="elements per cache block when compression is "
                                                                 "fused with the reduction on CPU arrays")
    p2p: bool = Field(True, description="enable direct GPU-to-GPU copies where the hardware allows")


def _slot_device(value: Any, slot: int) -> tuple:
    """The device a pushed value stands for: ('gpu', id) for cupy, ('cpu', slot) otherwise."""
    arr = value.data if isinstance(value, RowSparseArray) else value
    dev = device_id(arr)
    return ("cpu", slot) if dev is None else ("gpu", dev)


def _dense(value: Any) -> Any:
    """A dense array of ``value``, made on the device that holds it."""
    if not isinstance(value, RowSparseArray):
        return value
    if device_id(value.data) is None:
        return value.todense()
    with value.data.device:
        return value.todense()


def _memory(dev: tuple) -> int | None:
    """Where a device's buffers live: a GPU id, or None for host memory."""
    return dev[1] if dev[0] == "gpu" else None


def _copy(value: Any) -> Any:
    """A copy of ``value`` on its own device."""
    return copy_into(empty_on(device_id(value), value.shape, value.dtype), value)


class DeviceStore(InProcessUpdates, StoreBackend):
    capabilities = frozenset({"optimizer", "row_sparse", "compression"})

    def __init__(self, config: DeviceConfig):
        super().__init__(config)
        self._values = KeyValues(Reducer(config.reduce_threads, config.bigarray_bound))
        self._pending: list = []  # keys initialised but not yet placed
        self._merge_dev: dict = {}  # key -> device tuple
        self._loads: dict = {}  # device tuple -> elements placed there
        self._compressor: Any = None
        self._residual: dict = {}  # key -> list (per slot) of flat residual arrays

    def set_updater(self, updater: Any) -> None:
        super().set_updater(updater)
        self._values.updater = updater

    # placement --------------------------------------------------------------------------------
    def init(self, keys: Keys, values: list[Array]) -> None:
        for k, v in zip(keys, values):
            arr = v.todense() if isinstance(v, RowSparseArray) else v
            dev = device_id(arr)
            self._values[k] = np.array(arr, copy=True, order="C") if dev is None else \
                copy_into(empty_on(dev, arr.shape, arr.dtype), arr)
        self._pending.extend(keys)

    def _assign(self, devices: list) -> None:
        """Place the pending keys, largest first, each on the least-loaded of ``devices``."""
        if not self._pending or not devices:
            return
        for d in devices:
            self._loads.setdefault(d, 0)
        gpus = sorted({d[1] for d in devices if d[0] == "gpu"})
        if len(gpus) > 1 and self.config.p2p:
            enable_peer_access(gpus)
        order = sorted(self._pending, key=lambda k: -self._values[k].size)  # stable: init order breaks ties
        for k in order:
            dev = min(devices, key=lambda d: self._loads[d])
            self._loads[dev] += int(self._values[k].size)
            self._merge_dev[k] = dev
            self._values[k] = to_device(self._values[k], _memory(dev))
        self._pending = []

    def merge_device(self, key: Any) -> tuple | None:
        """The device that reduces ``key``: ('cpu', slot) or ('gpu', id); None before its first push."""
        return self._merge_dev.get(key)

    @property
    def device_loads(self) -> dict:
        """Elements placed on each device so far."""
        return dict(self._loads)

    # push -----------------------------------------------------------------------------------------
    def push(self, keys: Keys, values: PerKey, priority: int = 0) -> None:
        grouped = {keys[0]: values[0]} if len(keys) == 1 else group_by_key(keys, values)
        if self._compressor is not None:  # refuse bad input before anything changes
            for k, vals in grouped.items():
                self._check_compressible(k, vals)
        if self._pending:
            devices: list = []
            for vals in grouped.values():
                for i, v in enumerate(vals):
                    d = _slot_device(v, i)
                    if d not in devices:
                        devices.append(d)
            self._assign(devices)
        # row-sparse values reach the updater on the held value's device (host, or densified there)
        if self._values.needs_staging(grouped, lambda k, vals: self._values[k]):
            self._staged_push(grouped)
        else:
            for k, vals in grouped.items():
                self._push_key(k, vals)

    def _staged_push(self, grouped: dict) -> None:
        """All or nothing: values and compression residuals of the keys are put back on failure."""
        saved = {k: [_copy(r) for r in self._residual[k]] for k in grouped if k in self._residual}
        try:
            with self._values.staged(grouped, _copy):
                for k, vals in grouped.items():
                    self._push_key(k, vals)
        except BaseException:
            for k in grouped:
                if k in saved:
                    self._residual[k] = saved[k]
                else:
                    self._residual.pop(k, None)
            raise

    def _check_compressible(self, key: Any, vals: list) -> None:
        check = getattr(self._compressor, "check_dtype", None)
        for v in vals:
            if isinstance(v, RowSparseArray):
                continue  # row-sparse gradients are sent uncompressed, as in MXNet
            if check is not None:
                try:
                    check(v.dtype)
                except (TypeError, ValueError) as exc:
                    raise DTypeMismatchError(f"key {key!r}: {exc}") from None

    def _push_key(self, key: Any, vals: list) -> None:
        held = self._values[key]
        sparse = any(isinstance(v, RowSparseArray) for v in vals)
        host = device_id(held) is None and all(type(v) is np.ndarray for v in vals)
        if self._compressor is not None and not sparse:
            self._compressed_push(key, vals)
        elif host or (sparse and device_id(held) is None):
            self._values.push_on_host(key, [to_host(v) for v in vals])
        else:
            self._values.apply(key, self._on_held_device(key, self._device_merge(key, vals)))

    def _target(self, key: Any) -> Any:
        """Where the merged value is written: the held value itself without an updater."""
        return self._values[key] if self._values.updater is None else self._values.merge_buffer(key)

    def _device_merge(self, key: Any, vals: list) -> Any:
        """Uncompressed reduce of dense values on the key's merge device (written into the held
        value itself when there is no updater)."""
        mem = device_id(self._values[key])
        dense = [_dense(v) for v in vals]
        if len(dense) == 1 and device_id(dense[0]) == mem and self._values.updater is not None:
            return dense[0]
        target = self._target(key)
        copy_into(target, dense[0])
        if mem is None:
            for v in dense[1:]:
                target += v if device_id(v) is None else v.get()
            return target
        with target.device:
            for v in dense[1:]:
                target += to_device(v, mem)
        return target

    def _on_held_device(self, key: Any, merged: Any) -> Any:
        """``merged`` where the held value lives (host memory or its GPU)."""
        mem = device_id(self._values[key])
        if isinstance(merged, RowSparseArray):
            if mem is None:
                return to_host(merged)
            return RowSparseArray(to_device(merged.data, mem), to_device(merged.indices, mem), merged.shape)
        return to_device(merged, mem) if device_id(merged) != mem else merged

    # compression ----------------------------------------------------------------------------------
    def set_gradient_compression(self, compressor: Any) -> None:
        self._compressor = compressor
        self._residual = {}

    @property
    def compressor(self) -> Any:
        return self._compressor

    def residual(self, key: Any, slot: int) -> Any:
        """The residual of ``key`` kept for device slot ``slot`` (flat), or None."""
        res = self._residual.get(key)
        return None if res is None or slot >= len(res) else res[slot]

    def _residuals(self, key: Any, vals: list) -> list:
        res = self._residual.setdefault(key, [])
        for i, v in enumerate(vals):
            dev = device_id(v)
            if i == len(res):
                res.append(zeros_on(dev, (v.size,), v.dtype))
            elif device_id(res[i]) != dev:  # this slot's device changed: carry its residual over
                res[i] = to_device(res[i], dev)
        return res

    def _compressed_push(self, key: Any, vals: list) -> None:
        if timeline.enabled:  # KVFRAME_TIMELINE: encode + decode + sum as one phase (fused on CPU)
            with timeline.span("compress+reduce", key=key, nbytes=timeline.nbytes(vals), copies=len(vals)):
                self._compress_and_sum(key, vals)
        else:
            self._compress_and_sum(key, vals)

    def _compress_and_sum(self, key: Any, vals: list) -> None:
        comp = self._compressor
        res = self._residuals(key, vals)
        target = self._target(key)
        mem = device_id(target)
        multiple = getattr(comp, "block_multiple", None)
        if mem is None and multiple and all(type(v) is np.ndarray for v in vals) and target.flags.c_contiguous:
            self._fused_host(comp, [v.reshape(-1) if v.flags.c_contiguous else np.ascontiguousarray(v).reshape(-1)
                                    for v in vals], res, target.reshape(-1), multiple)
        else:
            for i, v in enumerate(vals):
                dev = device_id(v)
                if dev is None:
                    payload = comp.encode(v, res[i])
                else:
                    with v.device:
                        payload = comp.encode(v, res[i].reshape(v.shape))
                payload = to_device(payload, mem)
                if mem is None:
                    comp.decode(payload, target, accumulate=i > 0)
                else:
                    with target.device:
                        comp.decode(payload, target, accumulate=i > 0)
        if self._values.updater is not None:  # without one the sum was written into the held value
            with timeline.span("update", key=key):
                self._values.apply(key, target)

    def _fused_host(self, comp: Any, flats: list, res: list, out: np.ndarray, multiple: int) -> None:
        """Encode, decode and sum block by block, each block staying in cache.  A codec with
        ``encode_decode_sum_into`` does it for every copy in one pass over a block, one with
        ``encode_decode_into`` in one pass per copy (compiled kernels)."""
        n = out.size
        block = math.ceil(self.config.block / multiple) * multiple
        fused_sum = getattr(comp, "encode_decode_sum_into", None)
        fused = getattr(comp, "encode_decode_into", None)

        def work(lo: int, hi: int) -> None:
            for s in range(lo, hi, block):
                e = min(s + block, hi)
                o = out[s:e]
                if fused_sum is not None:  # every copy in one pass over the block
                    fused_sum([g[s:e] for g in flats], [r[s:e] for r in res], o)
                    continue
                for i, g in enumerate(flats):
                    if fused is not None:
                        fused(g[s:e], res[i][s:e], o, i > 0)
                    else:
                        comp.decode(comp.encode(g[s:e], res[i][s:e]), o, accumulate=i > 0)

        if n < self.config.bigarray_bound:
            work(0, n)
        else:
            parallel.run_ranges(work, n, self._values.reducer.threads, block)

    # pull -----------------------------------------------------------------------------------------
    def pull(self, keys: Keys, outs: PerKey, priority: int = 0, ignore_sparse: bool = True) -> Handle:
        for k, os_ in zip(keys, outs):
            held = self._values[k]
            if device_id(held) is None and all(type(o) is np.ndarray or isinstance(o, RowSparseArray) for o in os_):
                self._values.pull_on_host(k, os_)
                continue
            for o in os_:
                if isinstance(o, RowSparseArray):
                    xp = array_module(held)
                    o.data, o.indices = held.copy(), xp.arange(held.shape[0], dtype=np.int64)
                else:
                    copy_into(o, held)
        return COMPLETED

    def row_sparse_pull(self, keys: Keys, outs: PerKey, row_ids: PerKey, priority: int = 0) -> Handle:
        for k, os_, ids in zip(keys, outs, row_ids):
            self._values.row_sparse_pull(k, os_, ids)
        return COMPLETED
