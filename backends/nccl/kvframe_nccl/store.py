"""Store 'nccl': sums over NVIDIA NCCL through ``cupy.cuda.nccl``.

Single-process mode (MXNet's nccl): one process drives a fixed list of GPUs with one NCCL
communicator per GPU (``NcclCommunicator.initAll``). A key's value lives on the first GPU. ``push``
is an ``ncclReduce`` to the first GPU (then the updater runs there), ``pull`` an ``ncclBroadcast``
from it, and ``pushpull`` without an updater a single ``ncclAllReduce`` straight into the outputs.

Multi-process mode: one GPU per process, ranks and world size from the launcher, the NCCL unique
id handed out by rank 0 over :mod:`kvframe_nccl.rendezvous`. Every rank keeps its own copy of each
value: ``push`` all-reduces and each rank runs the (deterministic) updater; ``pull`` is local.

Every call's collectives are issued as one NCCL group; small keys are packed per dtype into
buckets (one collective per bucket). Work goes on each GPU's *current* cupy stream, so it is
ordered after the kernels that produced the gradients and before later ones on that stream;
``pull``/``pushpull`` return a handle whose ``wait`` blocks (with a timeout) until the GPUs are
done, and the front waits on it unless ``wait=False``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Hashable
from typing import Any

import numpy as np

from kvframe.arrays import Array, RowSparseArray
from kvframe.backend import DEFAULT_TIMEOUT, Handle, InProcessUpdates, Keys, PerKey, StoreBackend
from kvframe.errors import ConfigError, KeyNotInitializedError, KVTimeoutError, NotSupportedError
from kvframe.jobenv import job_secret
from kvframe_nccl import buckets, cuda
from kvframe_nccl.config import NcclConfig
from kvframe_nccl.launch_env import LaunchEnvError, LaunchInfo, detect_launch, rendezvous_address, validate
from kvframe_nccl.rendezvous import RendezvousError, exchange_unique_id

ROOT = 0  # index of the first GPU in this process's device list, and NCCL rank of the root


class GpuHandle(Handle):
    """Done when the CUDA events recorded after a call's work have completed."""

    def __init__(self, events: list, what: str, timeout: float, on_timeout: Any = None):
        self._events = events
        self._what = what
        self._timeout = timeout
        self._on_timeout = on_timeout

    def done(self) -> bool:
        return all(e.done for e in self._events)

    def wait(self, timeout: float | None = None) -> None:
        limit = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        polls = 0
        for ev in self._events:
            while not ev.done:
                if time.monotonic() > deadline:
                    extra = self._on_timeout() if self._on_timeout is not None else ""
                    raise KVTimeoutError(f"timed out after {limit:g} s waiting for the GPUs to finish {self._what} "
                                         f"(a peer process may have died, or a kernel hangs){extra}")
                polls += 1
                time.sleep(0 if polls < 2000 else 0.0002)


class _Ranges:
    """Byte ranges of the arrays a collective group reads directly, to spot outputs that alias them."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self._starts = sorted(s for s, _ in ranges)
        self._ends = sorted(e for _, e in ranges)

    def overlapping(self, start: int, end: int) -> int:
        return bisect.bisect_left(self._starts, end) - bisect.bisect_right(self._ends, start)


def _span(a: Any) -> tuple[int, int]:
    return int(a.data.ptr), int(a.data.ptr) + int(a.nbytes)


class NcclStore(InProcessUpdates, StoreBackend):
    capabilities = frozenset({"optimizer"})

    def __init__(self, config: NcclConfig):
        super().__init__(config)
        stack = cuda.require()
        self._cp, self._nccl = stack.cupy, stack.nccl
        self._timeout = float(config.timeout or DEFAULT_TIMEOUT)
        self._data: dict[Hashable, Any] = {}
        self._no_value: set = set()
        self._plans: dict[tuple, list[buckets.Unit]] = {}
        self._codes: dict[str, int] = {}  # numpy dtype.str -> NCCL dtype code
        self._closed = False
        self._barrier_buf: Any = None  # a cupy array, made by the first barrier
        launch = self._launch_info(config)
        if launch is None:
            self._rank, self._world = 0, 1
            self._devices = self._single_devices(config, stack.device_count)
            self._comms = list(self._nccl.NcclCommunicator.initAll(list(self._devices)))
            self.multi = False
        else:
            self._rank, self._world = launch.rank, launch.world_size
            self._devices = [self._multi_device(config, launch, stack.device_count)]
            self._comms = [self._connect(config, launch)]
            self.multi = True
        self._dev_index = {d: i for i, d in enumerate(self._devices)}

    # setup -----------------------------------------------------------------------------------
    @staticmethod
    def _launch_info(config: NcclConfig) -> LaunchInfo | None:
        if config.mode == "single":
            return None
        try:
            if config.rank is not None and config.world_size is not None:  # given together (NcclConfig checks)
                env = detect_launch_or_none()
                local = config.local_rank if config.local_rank is not None else (env.local_rank if env else None)
                return validate(config.rank, config.world_size, local, "the store options")
            info = detect_launch()
        except LaunchEnvError as exc:
            raise ConfigError(f"store 'nccl': {exc}") from None
        if info is None:
            if config.mode == "multi":
                raise ConfigError("store 'nccl' mode 'multi' needs this process's rank and the world size: start it "
                                  "with a launcher that sets KVFRAME_RANK/KVFRAME_WORLD_SIZE (or RANK/WORLD_SIZE, "
                                  "OMPI_COMM_WORLD_RANK/SIZE), or pass rank= and world_size=")
            return None
        if config.local_rank is not None:
            info = LaunchInfo(info.rank, info.world_size, config.local_rank, info.source)
        return info

    @staticmethod
    def _single_devices(config: NcclConfig, count: int) -> list[int]:
        if config.devices is None:
            devices = list(range(count))
        elif isinstance(config.devices, int):
            devices = list(range(config.devices))
        else:
            devices = list(config.devices)
        bad = [d for d in devices if d >= count]
        if bad:
            raise ConfigError(f"store 'nccl': devices {devices} include {bad}, but this process sees {count} GPU(s) "
                              f"(ids 0..{count - 1}; CUDA_VISIBLE_DEVICES renumbers them)")
        return devices

    @staticmethod
    def _multi_device(config: NcclConfig, launch: LaunchInfo, count: int) -> int:
        if isinstance(config.devices, list):
            device = config.devices[0]
        elif launch.local_rank is not None:
            device = launch.local_rank % count
        else:
            device = launch.rank % count
        if device >= count:
            raise ConfigError(f"store 'nccl': rank {launch.rank} would use GPU {device}, but this process sees "
                              f"{count} GPU(s)")
        return device

    def _connect(self, config: NcclConfig, launch: LaunchInfo) -> Any:

        cp, nccl = self._cp, self._nccl
        make_id = lambda: cuda.uid_to_bytes(nccl.get_unique_id())  # noqa: E731
        token = config.token if config.token is not None else job_secret()
        with cp.cuda.Device(self._devices[0]):
            if launch.world_size == 1:
                raw = make_id()
            else:
                try:
                    addr = (rendezvous_address({"KVFRAME_NCCL_ADDR": config.rendezvous}) if config.rendezvous
                            else rendezvous_address())
                except LaunchEnvError as exc:
                    raise ConfigError(f"store 'nccl': {exc}") from None
                if addr is None:
                    raise ConfigError(
                        f"store 'nccl' with {launch.world_size} processes needs an address where rank 0 hands out "
                        "the NCCL unique id: set KVFRAME_NCCL_ADDR=host:port (the same on every rank; host is rank "
                        "0's), or MASTER_ADDR and MASTER_PORT (port+1 is used), or pass rendezvous='host:port'")
                try:
                    raw = exchange_unique_id(launch.rank, launch.world_size, addr[0], addr[1], make_id,
                                             config.rendezvous_timeout, token)
                except RendezvousError as exc:
                    if isinstance(exc, TimeoutError):
                        raise KVTimeoutError(str(exc)) from exc
                    raise
            return nccl.NcclCommunicator(launch.world_size, cuda.uid_for_cupy(raw, cp.__version__), launch.rank)

    # identity --------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def num_workers(self) -> int:
        return self._world

    @property
    def devices(self) -> list[int]:
        return list(self._devices)

    # helpers ---------------------------------------------------------------------------------
    def _stream(self, j: int) -> Any:
        with self._cp.cuda.Device(self._devices[j]):
            return self._cp.cuda.get_current_stream()

    def _record(self, streams: list, what: str) -> GpuHandle:
        events = []
        for j, s in enumerate(streams):
            with self._cp.cuda.Device(self._devices[j]):
                events.append(s.record())
        return GpuHandle(events, what, self._timeout, self._abort if self.multi and self._world > 1 else None)

    def _abort(self) -> str:
        """After a timed-out wait across processes: abort the communicator so nothing stays stuck in NCCL."""
        for comm in self._comms:
            try:
                comm.abort()
            except Exception:
                pass
        self._comms = []
        self._closed = True
        return "; the NCCL communicator was aborted and this store is closed: every rank must create a new one"

    def _check_open(self) -> None:
        if self._closed:
            raise NotSupportedError("this nccl store is closed: its NCCL communicators were destroyed")

    def _refuse_sparse(self, key: Any, a: Any) -> None:
        if isinstance(a, RowSparseArray):
            raise NotSupportedError(f"key {key!r}: store 'nccl' does not support row-sparse arrays (as in MXNet); "
                                    "use store 'local' or 'device' for sparse keys")

    def _gpu_array(self, key: Any, a: Any, what: str) -> int:
        """The device index of ``a``, or a clear error when it is not a cupy array on this store's GPUs."""
        self._refuse_sparse(key, a)
        if not isinstance(a, self._cp.ndarray):
            raise TypeError(f"key {key!r}: {what} is a {type(a).__name__}; store 'nccl' moves cupy arrays on its "
                            f"GPUs {self._devices}. Put it there (with cupy.cuda.Device(d): x = cupy.asarray(x)), "
                            "or use store 'device' or 'local' for host arrays")
        d = a.device.id
        j = self._dev_index.get(d)
        if j is None:
            raise ValueError(f"key {key!r}: {what} is on GPU {d}, but this nccl store drives GPUs {self._devices} "
                             "(pass devices=[...] to kvframe.create('nccl', ...))")
        return j

    def _per_device(self, keys: Keys, values: PerKey, what: str) -> tuple[list, list[dict[int, list]]]:
        """Group repeated keys (their values are summed) and sort each key's arrays by device index."""
        self._check_open()
        order: list = []
        grouped: dict = {}
        for k, vals in zip(keys, values):
            if k not in grouped:
                order.append(k)
                grouped[k] = {}
            if k not in self._data:
                raise KeyNotInitializedError(f"key {k!r} has not been initialised; call init({k!r}, value) first")
            for i, a in enumerate(vals):
                j = self._gpu_array(k, a, f"{what} {i}" if len(vals) > 1 else what)
                grouped[k].setdefault(j, []).append(a)
        return order, [grouped[k] for k in order]

    def _plan(self, keys: list) -> list[buckets.Unit]:
        sig = tuple(keys)
        units = self._plans.get(sig)
        if units is None:
            cfg = self.config
            items = [(k, self._data[k].shape, self._data[k].dtype) for k in keys]
            units = buckets.plan(items, cfg.bucket_bytes, cfg.pack_threshold_bytes)
            if len(self._plans) > 512:
                self._plans.clear()
            self._plans[sig] = units
        return units

    def _sum_on_device(self, arrays: list, shape: tuple, dtype: Any) -> Any:
        """One contiguous array holding the sum of ``arrays`` (all on the current device); zeros if none."""
        cp = self._cp
        if not arrays:
            return cp.zeros(shape, dtype)
        if len(arrays) == 1:
            return cp.ascontiguousarray(arrays[0])
        out = cp.empty(shape, dtype)
        cp.add(arrays[0], arrays[1], out=out)
        for a in arrays[2:]:
            cp.add(out, a, out=out)
        return out

    def _send_buffers(self, units: list[buckets.Unit], contribs: list[dict[int, list]]) -> list[list]:
        """Per unit, per device: the flat contiguous array this device contributes."""
        cp = self._cp
        sends = []
        for u in units:
            per_dev = []
            for j, d in enumerate(self._devices):
                with cp.cuda.Device(d):
                    if not u.packed:
                        m = u.members[0]
                        a = self._sum_on_device(contribs[m.index].get(j, []), m.shape, u.dtype)
                        per_dev.append(a.reshape(-1))
                    else:
                        flat = cp.empty(u.count, u.dtype)
                        parts = [self._sum_on_device(contribs[m.index].get(j, []), m.shape, u.dtype)
                                 for m in u.members]
                        buckets.pack(cp, parts, flat)
                        per_dev.append(flat)
            sends.append(per_dev)
        return sends

    def _collective(self, op: str, units: list[buckets.Unit], sends: list[list], recvs: list[list],
                    streams: list) -> None:
        """One NCCL group: for each unit, ``op`` ('reduce', 'allreduce' or 'broadcast') over all devices."""
        nccl = self._nccl
        # everything that can fail is worked out before the group: a group issued on only some of
        # the GPUs would leave the others waiting in NCCL
        codes = self._codes
        for u in units:
            if u.dtype.str not in codes:
                codes[u.dtype.str] = cuda.nccl_dtype(u.dtype, nccl)
        calls = []
        for u, s_u, r_u in zip(units, sends, recvs):
            if u.count == 0:
                continue
            for j in range(len(self._comms)):
                send, recv = s_u[j], r_u[j]
                sp = int(send.data.ptr) if send is not None else int(recv.data.ptr)
                rp = int(recv.data.ptr) if recv is not None else sp
                calls.append((j, sp, rp, u.count, codes[u.dtype.str]))
        stream_ptrs = [int(s.ptr) for s in streams]
        comms = self._comms
        nccl.groupStart()
        try:
            for j, sp, rp, count, code in calls:
                if op == "allreduce":
                    comms[j].allReduce(sp, rp, count, code, nccl.NCCL_SUM, stream_ptrs[j])
                elif op == "reduce":
                    comms[j].reduce(sp, rp, count, code, nccl.NCCL_SUM, ROOT, stream_ptrs[j])
                else:
                    comms[j].broadcast(sp, rp, count, code, ROOT, stream_ptrs[j])
        finally:
            nccl.groupEnd()

    def _store_results(self, units: list[buckets.Unit], root_flats: list) -> None:
        """The reduced values (flat, on the root GPU) become the stored values, through the updater if set."""
        cp = self._cp
        with cp.cuda.Device(self._devices[ROOT]):
            for u, flat in zip(units, root_flats):
                grads = buckets.views(flat, u)
                for m, g in zip(u.members, grads):
                    stored = self._data[m.key]
                    if self._updater is not None:
                        self._updater(m.key, g, stored)
                    elif stored.data.ptr != g.data.ptr:
                        _copy(stored, g)
                    self._no_value.discard(m.key)

    # data ------------------------------------------------------------------------------------
    def init(self, keys: Keys, values: list[Array]) -> None:
        self._check_open()
        cp = self._cp
        for k, v in zip(keys, values):  # check everything before storing anything
            self._refuse_sparse(k, v)
            if not isinstance(v, (np.ndarray, cp.ndarray)):
                raise TypeError(f"key {k!r}: init takes a numpy or cupy array; got {type(v).__name__}")
            try:
                cuda.nccl_dtype(v.dtype, self._nccl)
            except TypeError as exc:
                raise TypeError(f"key {k!r}: {exc}") from None
        new: dict[Hashable, Any] = {}
        with cp.cuda.Device(self._devices[ROOT]):
            for k, v in zip(keys, values):
                if isinstance(v, cp.ndarray):
                    if v.device.id != self._devices[ROOT]:
                        with cp.cuda.Device(v.device.id):
                            cp.cuda.get_current_stream().synchronize()
                    new[k] = v.copy(order="C")  # copies to the current (root) GPU
                else:
                    new[k] = cp.array(np.ascontiguousarray(v), copy=True)
        self._data.update(new)
        self._no_value.difference_update(new)
        if self.multi and self._world > 1:
            self._broadcast_from_rank0(list(new))

    def _broadcast_from_rank0(self, keys: list) -> None:
        """Multi-process init: every rank takes rank 0's value."""
        units = self._plan(keys)
        streams = [self._stream(0)]
        flats = []
        with self._cp.cuda.Device(self._devices[0]):
            for u in units:
                if u.packed:
                    flat = self._cp.empty(u.count, u.dtype)
                    buckets.pack(self._cp, [self._data[m.key] for m in u.members], flat)
                else:
                    flat = self._data[u.members[0].key].reshape(-1)
                flats.append([flat])
            self._collective("broadcast", units, flats, flats, streams)
            for u, (flat,) in zip(units, flats):
                if u.packed:
                    buckets.unpack(flat, u, [self._data[m.key] for m in u.members])
        self._record(streams, f"init of keys {keys!r}").wait()

    def push(self, keys: Keys, values: PerKey, priority: int = 0) -> None:
        order, contribs = self._per_device(keys, values, "pushed value")
        self._reduce_and_store(order, contribs)

    def _reduce_and_store(self, order: list, contribs: list[dict[int, list]]) -> list:
        cp = self._cp
        units = self._plan(order)
        streams = [self._stream(j) for j in range(len(self._devices))]
        sends = self._send_buffers(units, contribs)
        recvs = []
        for u, s_u in zip(units, sends):
            # ncclReduce ignores the receive buffer off the root: pass the send buffer there
            r_u = list(s_u)
            with cp.cuda.Device(self._devices[ROOT]):
                if not u.packed and self._updater is None:
                    r_u[ROOT] = self._data[u.members[0].key].reshape(-1)  # reduce straight into the store
                else:
                    r_u[ROOT] = cp.empty(u.count, u.dtype)
            recvs.append(r_u)
        self._collective("allreduce" if self.multi else "reduce", units, sends, recvs, streams)
        self._store_results(units, [r[ROOT] for r in recvs])
        return units

    def pull(self, keys: Keys, outs: PerKey, priority: int = 0, ignore_sparse: bool = True) -> Handle:
        self._check_open()
        placed = []
        for k, os_ in zip(keys, outs):
            if k in self._no_value:
                raise NotSupportedError(f"key {k!r}: its last value came from pushpull with pushpull_stores=False, "
                                        "which does not keep it; pull needs pushpull_stores=True (the default)")
            per: dict[int, list[Any]] = {}
            for i, o in enumerate(os_):
                j = self._gpu_array(k, o, f"out {i}" if len(os_) > 1 else "out")
                per.setdefault(j, []).append(o)
            placed.append(per)
        return self._broadcast_to(keys, placed, f"pull of keys {keys!r}")

    def _broadcast_to(self, keys: Keys, placed: list[dict[int, list]], what: str) -> Handle:
        """Write each key's stored value into its outputs on every GPU."""
        cp = self._cp
        streams = [self._stream(j) for j in range(len(self._devices))]
        if len(self._devices) == 1:  # one GPU here: a local copy is all a broadcast would do
            with cp.cuda.Device(self._devices[0]):
                for k, per in zip(keys, placed):
                    for o in per.get(0, []):
                        _copy(o, self._data[k])
            return self._record(streams, what)
        order: list = []
        merged: dict = {}
        for k, per in zip(keys, placed):
            if k not in merged:
                order.append(k)
                merged[k] = {}
            for j, os_ in per.items():
                merged[k].setdefault(j, []).extend(os_)
        units = self._plan(order)
        sends, recvs = [], []
        for u in units:
            s_u: list = [None] * len(self._devices)
            r_u: list = [None] * len(self._devices)
            for j, d in enumerate(self._devices):
                with cp.cuda.Device(d):
                    if not u.packed:
                        m = u.members[0]
                        stored = self._data[m.key]
                        if j == ROOT:
                            s_u[j] = stored.reshape(-1)
                            r_u[j] = s_u[j]  # in place on the root; its outputs are copied below
                        else:
                            os_ = merged[m.key].get(j, [])
                            direct = os_[0] if len(os_) == 1 and os_[0].flags.c_contiguous else None
                            r_u[j] = direct.reshape(-1) if direct is not None else cp.empty(u.count, u.dtype)
                    else:
                        flat = cp.empty(u.count, u.dtype)
                        if j == ROOT:
                            buckets.pack(cp, [self._data[m.key] for m in u.members], flat)
                            s_u[j] = flat
                        r_u[j] = flat
            sends.append(s_u)
            recvs.append(r_u)
        self._collective("broadcast", units, sends, recvs, streams)
        for u, r_u in zip(units, recvs):
            for j, d in enumerate(self._devices):
                with cp.cuda.Device(d):
                    for m, view in zip(u.members, buckets.views(r_u[j], u)):
                        for o in merged[m.key].get(j, []):
                            if j == ROOT:
                                _copy(o, self._data[m.key])
                            elif o.data.ptr != view.data.ptr:
                                _copy(o, view)
        return self._record(streams, what)

    def pushpull(self, keys: Keys, values: PerKey, outs: PerKey, priority: int = 0) -> Handle:
        if self._updater is not None or (self.config.algorithm == "reduce_broadcast" and not self.multi):
            order, contribs = self._per_device(keys, values, "pushed value")
            placed = []
            for k, os_ in zip(keys, outs):
                per: dict = {}
                for i, o in enumerate(os_):
                    per.setdefault(self._gpu_array(k, o, f"out {i}" if len(os_) > 1 else "out"), []).append(o)
                placed.append(per)
            self._reduce_and_store(order, contribs)
            return self._broadcast_to(keys, placed, f"pushpull of keys {keys!r}")
        return self._allreduce(keys, values, outs)

    def _allreduce(self, keys: Keys, values: PerKey, outs: PerKey) -> Handle:
        """pushpull without an updater: one all-reduce, straight into the outputs where that is safe."""
        cp = self._cp
        order, contribs = self._per_device(keys, values, "pushed value")
        out_keys, placed = self._per_device(keys, outs, "out")
        merged_outs = dict(zip(out_keys, placed))
        units = self._plan(order)
        streams = [self._stream(j) for j in range(len(self._devices))]
        sends = self._send_buffers(units, contribs)
        # with several units an output may alias another unit's input; with one, only its own
        direct_sends = _Ranges([_span(s) for s_u, u in zip(sends, units) if not u.packed for s in s_u]) \
            if len(units) > 1 else None
        recvs = []
        for u, s_u in zip(units, sends):
            r_u = []
            for j, d in enumerate(self._devices):
                recv = None
                if not u.packed:
                    os_ = merged_outs.get(u.members[0].key, {}).get(j, [])
                    if len(os_) == 1 and os_[0].flags.c_contiguous:
                        cand = os_[0].reshape(-1)
                        lo, hi = _span(cand)
                        # in place (out is the value) is fine; any other overlap with what the group reads is not
                        own = _span(s_u[j])
                        if direct_sends is not None:
                            if direct_sends.overlapping(lo, hi) == (1 if own == (lo, hi) else 0):
                                recv = cand
                        elif own == (lo, hi) or hi <= own[0] or own[1] <= lo:
                            recv = cand
                if recv is None:
                    with cp.cuda.Device(d):
                        recv = cp.empty(u.count, u.dtype)
                r_u.append(recv)
            recvs.append(r_u)
        self._collective("allreduce", units, sends, recvs, streams)
        for u, r_u in zip(units, recvs):
            for j, d in enumerate(self._devices):
                with cp.cuda.Device(d):
                    for m, view in zip(u.members, buckets.views(r_u[j], u)):
                        for o in merged_outs.get(m.key, {}).get(j, []):
                            if o.data.ptr != view.data.ptr or o.nbytes != view.nbytes:
                                _copy(o, view)
                        if j == ROOT:
                            if self.config.pushpull_stores:
                                _copy(self._data[m.key], view)
                                self._no_value.discard(m.key)
                            else:
                                self._no_value.add(m.key)
        return self._record(streams, f"pushpull of keys {keys!r}")

    def broadcast(self, keys: Keys, values: PerKey, outs: PerKey, priority: int = 0) -> Handle:
        self.init(keys, [v[0] for v in values])
        return self.pull(keys, outs, priority)

    def row_sparse_pull(self, keys: Keys, outs: PerKey, row_ids: PerKey, priority: int = 0) -> Handle:
        raise NotSupportedError("store 'nccl' does not support row_sparse_pull (no sparse arrays, as in MXNet); use "
                                "store 'local' or 'device'")

    # updates ---------------------------------------------------------------------------------
    def get_optimizer_states(self, dump_optimizer: bool = False) -> bytes:
        self._synchronize()  # the states are updated on the GPUs' streams
        return super().get_optimizer_states(dump_optimizer)

    def set_gradient_compression(self, compressor: Any) -> None:
        raise NotSupportedError("store 'nccl' does not support gradient compression (as in MXNet): NCCL sums the "
                                "full-precision values. Use store 'device' or a dist store for compression")

    # control ---------------------------------------------------------------------------------
    def _synchronize(self) -> None:
        self._record([self._stream(j) for j in range(len(self._devices))], "queued work").wait()

    def barrier(self, timeout: float | None = None) -> None:
        """Multi-process: a one-element all-reduce every rank must reach. Single-process: waits for the GPUs."""
        if not self.multi or self._world == 1:
            self._synchronize()
            return
        cp = self._cp
        with cp.cuda.Device(self._devices[0]):
            if self._barrier_buf is None:
                self._barrier_buf = cp.zeros(1, np.float32)
            stream = cp.cuda.get_current_stream()
            self._nccl.groupStart()
            try:
                self._comms[0].allReduce(self._barrier_buf.data.ptr, self._barrier_buf.data.ptr, 1,
                                         cuda.NCCL_DTYPE_CODES["float32"], self._nccl.NCCL_SUM, stream.ptr)
            finally:
                self._nccl.groupEnd()
            handle = GpuHandle([stream.record()], f"the barrier of {self._world} ranks", self._timeout, self._abort)
        handle.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._synchronize()
        except Exception:
            pass
        for comm in self._comms:
            try:
                comm.destroy()
            except Exception:
                pass
        self._comms = []
        self._data.clear()


def _copy(dst: Any, src: Any) -> None:
    """dst[...] = src as a bit copy when both are contiguous (works for every dtype, bfloat16 too)."""
    if dst.flags.c_contiguous and src.flags.c_contiguous and dst.size == src.size:
        buckets.bits(dst)[...] = buckets.bits(src)
    else:
        dst[...] = src


def detect_launch_or_none() -> LaunchInfo | None:
    try:
        return detect_launch()
    except LaunchEnvError:
        return None


__all__ = ["NcclStore", "GpuHandle"]
