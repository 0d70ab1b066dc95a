"""The worker side of ``dist_sync``, ``dist_device_sync`` and ``dist_async``.

A call sends one message per server holding any of its keys (all the call's key shards batched),
then gathers the replies: no per-key round trips.  Large frames go out without a copy; ``push``
returns once zmq is done with the caller's memory.  A pull after a push is answered by the
server when that push's round completes, so ``pushpull`` is one round trip.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import re
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zmq
from kvframe_local.reduce import Reducer, sum_row_sparse
from pydantic import Field

from kvframe import plugins
from kvframe.arrays import RowSparseArray, array_module
from kvframe.config import StoreConfig, validate_plugin_config
from kvframe.errors import KVTimeoutError, NotSupportedError, RemoteError
from kvframe.store import DEFAULT_TIMEOUT, Handle, StoreBackend
from kvframe_dist.env import NodeEnv, node_env, role_from_env
from kvframe_dist.node import Heartbeat, register
from kvframe_dist.proto import Shard, dtype_name, pack_states, plan, unpack_states, wire_dtype
from kvframe_dist.shm import BATCH_MIN, HEADER, MIN_BYTES, Segment, align8, shm_dir
from kvframe_dist.transport import BadMessage, ZmqTransport

log = logging.getLogger("kvframe_dist.worker")


class DistConfig(StoreConfig):
    timeout: float | None = Field(None, gt=0, description="seconds any wait may take (default KVFRAME_TIMEOUT or "
                                                          "120)")
    bigarray_bound: int | None = Field(None, ge=1, description="arrays of at least this many elements are split over "
                                                               "all servers (default 1,000,000 or "
                                                               "KVFRAME_BIGARRAY_BOUND)")
    transport: str = Field("zmq", description="the transport plugin")
    reduce_threads: int | None = Field(None, ge=1, le=256, description="threads for the local reduce")
    compress_pulls: bool = Field(False, description="with gradient compression set, pulls are compressed too: "
                                                    "each pull after the first carries the compressed difference "
                                                    "between the server's value and the worker's copy")


class DistSyncConfig(DistConfig):
    type: Literal["dist_sync"] = "dist_sync"


class DistDeviceSyncConfig(DistConfig):
    type: Literal["dist_device_sync"] = "dist_device_sync"


class DistAsyncConfig(DistConfig):
    type: Literal["dist_async"] = "dist_async"


@dataclass
class KeyInfo:
    kid: int
    name: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    shards: list[Shard]
    sparse: bool
    raw_item: list | None = None  # [kid, 0, "raw"] for a key held whole by one server
    pull_items: list | None = None  # [[kid, part] for each shard]


def _items(header: dict, items: list, form: list) -> dict:
    """Items all of the form ``[key, *form]`` (whole keys) travel as a list of keys: ``rk`` for
    ``[key, 0, "raw"]``, ``pk`` for ``[key, 0]`` (shorter JSON on both sides)."""
    n = len(form) + 1
    if len(items) > 4 and all(len(it) == n and it[1:] == form for it in items):
        header["rk" if n == 3 else "pk"] = [it[0] for it in items]
    else:
        header["items"] = items
    return header


_RAW = [0, "raw"]
_WHOLE = [0]


def _keys_text(keys: list) -> str:
    """Keys for a message, short for long lists."""
    if len(keys) <= 6:
        return repr(keys)
    return f"[{keys[0]!r}, {keys[1]!r}, ..., {keys[-1]!r}] ({len(keys)} keys)"


class Request:
    __slots__ = ("rid", "server", "what", "on_data", "done", "error", "result")

    def __init__(self, rid: int, server: int, what: str, on_data: Any = None):
        self.rid, self.server, self.what, self.on_data = rid, server, what, on_data
        self.done = False
        self.error: str | None = None
        self.result: Any = None


class DistHandle(Handle):
    def __init__(self, store: DistStore, reqs: list[Request], what: str, finish: Any = None):
        self._store, self._reqs, self._what, self._finish = store, reqs, what, finish
        self._finished = False

    def wait(self, timeout: float | None = None) -> None:
        if self._finished:
            return
        self._store._wait(self._reqs, self._what, timeout)
        self._finished = True
        if self._finish is not None:
            self._finish()

    def done(self) -> bool:
        if not self._finished:
            self._store._drain(0)
        return self._finished or all(r.done for r in self._reqs)


def _as_host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


def _run_role_if_not_worker() -> None:
    """MXNet launch setups run the same script for every role: a server or scheduler that
    creates a dist store serves instead, then exits (as ``import mxnet`` did)."""
    role = role_from_env()
    if role == "server":
        from kvframe_dist.server import main
        sys.exit(main())
    if role == "scheduler":
        from kvframe_dist.scheduler import main
        sys.exit(main())


class DistStore(StoreBackend):
    capabilities = frozenset({"optimizer", "compression", "row_sparse"})
    own_states_format = True  # save/load_optimizer_states: a container of every server's states
    sync = True
    device_reduce = False

    def __init__(self, config: DistConfig, env: NodeEnv | None = None):
        super().__init__(config)
        if env is None:
            _run_role_if_not_worker()
            env = node_env("worker")
        self.env = env
        self.timeout = config.timeout or DEFAULT_TIMEOUT
        self.bound = config.bigarray_bound or env.bigarray_bound
        tconf = validate_plugin_config("transports", {"type": config.transport}, "transport")
        self.transport: ZmqTransport = plugins.create("transports", tconf).with_secret(env.secret)
        self.reducer = Reducer(config.reduce_threads, self.bound)
        self._closed = False
        self._failure: str | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, Request] = {}
        self._late_errors: list[str] = []
        self._unconfirmed: dict[int, tuple[int, str]] = {}  # push id -> (server, what): pushes are not acknowledged
        self._keys: dict[Any, KeyInfo] = {}
        self._str_ids: dict[str, int] = {}
        self._buffers: dict[int, np.ndarray] = {}
        self._residuals: dict[tuple[int, int], Any] = {}
        self._compressor: Any = None
        self._hb: Heartbeat | None = None
        self.shm = shm_dir()
        self._push_segs: dict[tuple[int, int], list] = {}  # (kid, part) -> [Segment, pushes not yet consumed]
        self._server_segs: dict[str, tuple[Segment, np.ndarray]] = {}
        self._batch_segs: dict[int, list] = {}  # server -> [Segment, its bytes, busy until consumed, generation]
        self._bank_srcs: dict[tuple, np.ndarray] = {}  # (bank, offset, dtype, count) -> the value's view there
        self._mirrors: dict[tuple[int, int], np.ndarray] = {}  # compressed pulls: this worker's copy per shard
        self.sched = self.transport.dealer(env.scheduler_addr)
        try:
            welcome = register(self.transport, self.sched, env, "worker")
        except BaseException:
            self.sched.close(linger=0)
            self.transport.close()
            raise
        self._rank = int(welcome["rank"])
        self._num_workers = int(welcome["num_workers"])
        self.server_addrs: list[str] = list(welcome["servers"])
        self.scheduler_pid = welcome.get("pid")
        ident = f"w{self._rank}".encode()
        self.servers = [self.transport.dealer(a, identity=ident) for a in self.server_addrs]
        self._poller = zmq.Poller()
        for s in self.servers:
            self._poller.register(s, zmq.POLLIN)
        self._sock_index = {s: i for i, s in enumerate(self.servers)}
        self._hb = Heartbeat(self.transport, env, "worker", self._rank)
        self._hb.start()
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    # identity -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    # messaging ------------------------------------------------------------------------------
    def _check_failure(self) -> None:
        if self._failure is None and self._hb is not None and self._hb.failure is not None:
            self._failure = self._hb.failure
        if self._failure is not None:
            raise RemoteError(f"worker {self._rank}: {self._failure}")
        if self._closed:
            raise RemoteError(f"worker {self._rank}: the store is closed")

    def _raise_late_errors(self) -> None:
        if self._late_errors:
            errs, self._late_errors = self._late_errors, []
            raise RemoteError("; ".join(errs))

    def _send(self, server: int, header: dict, frames: list = (), what: str = "", on_data: Any = None,
              track: list | None = None) -> Request:
        rid = next(self._ids)
        req = Request(rid, server, what or header["op"], on_data)
        self._pending[rid] = req
        header["id"] = rid
        trackers = self.transport.send(self.servers[server], header, frames, track=track is not None)
        if track is not None:
            track.extend(trackers)
        return req

    def _drain(self, timeout_ms: float) -> None:
        """Handle every reply that is there (waiting up to ``timeout_ms`` for the first)."""
        events = self._poller.poll(timeout_ms)
        for sock, _ in events:
            server = self._sock_index[sock]
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    _, h, frames = self.transport.recv(sock)
                except BadMessage as exc:
                    log.warning("worker %d dropped a message from server %d: %s", self._rank, server, exc)
                    continue
                used = h.get("consumed") or h.get("batch")
                if used:  # this worker's batch file for that server may be written again
                    slot = self._batch_segs.get(server)
                    if slot is not None and slot[0].name in (used if isinstance(used, list) else [used]):
                        slot[2] = 0
                if h["op"] == "consumed":
                    for it in h.get("items", []):
                        slot = self._push_segs.get(tuple(it))
                        if slot is not None and slot[1] > 0:
                            slot[1] -= 1
                    continue
                req = self._pending.pop(h.get("id"), None)
                if req is None and h["op"] == "error" and h.get("id") in self._unconfirmed:
                    self._late_errors.append(f"{self._unconfirmed.pop(h['id'])[1]} failed: {h.get('msg')}")
                    continue
                if req is None:
                    log.debug("worker %d: a reply from server %d answers no request (%s)", self._rank, server,
                                h.get("op"))
                    continue
                if h["op"] == "error":
                    req.error = str(h.get("msg"))
                    if req.on_data is None and req.what.startswith("push"):
                        self._late_errors.append(f"{req.what} failed: {req.error}")
                elif req.on_data is not None:
                    try:
                        req.on_data(h, frames)
                    except Exception as exc:  # a reply that does not fit what was asked
                        req.error = f"bad reply from server {server} at {self.server_addrs[server]}: {exc}"
                else:
                    req.result = h
                req.done = True

    def _wait(self, reqs: list[Request], what: str, timeout: float | None = None) -> None:
        try:
            self._wait_for(reqs, what, timeout)
        except BaseException:
            for r in reqs:  # given up: a late answer is ignored, and later waits do not wait for these
                self._pending.pop(r.rid, None)
            raise

    def _wait_for(self, reqs: list[Request], what: str, timeout: float | None = None) -> None:
        limit = self.timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + limit
        rounds = self.sync and ("pull" in what or "consume" in what)
        while not all(r.done for r in reqs):
            self._check_failure()
            if rounds and self._hb is not None and self._hb.closed and time.monotonic() - start > 1.0:
                names = ", ".join(sorted(self._hb.closed.values()))
                raise RemoteError(f"worker {self._rank}: {what} cannot complete: {names} closed its store, and a "
                                  f"sync round needs a push from each of the {self._num_workers} workers")
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted({r.server for r in reqs if not r.done})
                where = ", ".join(f"server {s} at {self.server_addrs[s]}" for s in missing)
                raise KVTimeoutError(f"worker {self._rank}: timed out after {limit:g} s waiting for {where} to answer "
                                     f"{what}" + (" (in sync mode a round needs every worker's push)"
                                                  if self.sync and "pull" in what else ""))
            self._drain(min(left, 0.1) * 1000)
        errors = [r.error for r in reqs if r.error]
        if errors:
            self._late_errors = []
            raise RemoteError(f"worker {self._rank}: {what} failed: " + "; ".join(dict.fromkeys(errors)))
        self._raise_late_errors()  # an earlier push that failed shows at the next wait

    def _wait_trackers(self, trackers: list, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        for t in trackers:
            while not t.done:
                self._check_failure()
                if time.monotonic() > deadline:
                    raise KVTimeoutError(f"worker {self._rank}: timed out after {self.timeout:g} s sending {what}")
                try:
                    t.wait(0.1)
                except zmq.NotDone:
                    pass

    def _flush(self, what: str) -> None:
        """Make sure every server has handled this worker's pushes (a ping after them: a server
        answers in order, errors of refused pushes first), and wait for every outstanding request."""
        servers = sorted({s for s, _ in self._unconfirmed.values()})
        for s in servers:
            self._send(s, {"op": "ping"}, what=f"{what} (server {s} confirming the pushes)")
        if self._pending:
            self._wait(list(self._pending.values()), what)
        self._unconfirmed.clear()
        self._raise_late_errors()

    def _to_scheduler(self, header: dict, what: str, timeout: float | None = None) -> dict:
        rid = next(self._ids)
        header["id"] = rid
        self.transport.send(self.sched, header)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            self._check_failure()
            left = deadline - time.monotonic()
            if left <= 0:
                raise KVTimeoutError(f"worker {self._rank}: timed out after {limit:g} s waiting for {what} (scheduler "
                                     f"at {self.env.scheduler_addr})")
            if not self.sched.poll(min(left, 0.1) * 1000):
                continue
            try:
                _, h, _ = self.transport.recv(self.sched)
            except BadMessage as exc:
                log.warning("worker %d dropped a message from the scheduler: %s", self._rank, exc)
                continue
            if h["op"] == "dead":
                self._failure = f"kvframe dist: {h.get('msg')}"
                self._check_failure()
            if h.get("id") != rid:
                continue
            if h["op"] == "error":
                raise RemoteError(f"worker {self._rank}: {what} failed: {h.get('msg')}")
            return h

    # keys -----------------------------------------------------------------------------------
    def _info(self, key: Any) -> KeyInfo:
        return self._keys[key]

    def _new_info(self, key: Any, value: Any) -> KeyInfo:
        if isinstance(key, str):
            kid = self._str_ids.setdefault(key, len(self._str_ids))
        else:
            kid = key
        shape = tuple(int(s) for s in value.shape)
        dtype = np.dtype(value.dtype)
        dtype_name(dtype)
        shards = plan(kid, shape, self.num_servers, self.bound)
        return KeyInfo(kid, key, shape, dtype, shards, isinstance(value, RowSparseArray),
                       [kid, 0, "raw"] if len(shards) == 1 else None, [[kid, sh.part] for sh in shards])

    # data -----------------------------------------------------------------------------------
    def init(self, keys: list, values: list) -> None:
        self._check_failure()
        infos = [self._new_info(k, v) for k, v in zip(keys, values)]
        if self._rank == 0:
            per_server: dict[int, tuple[list, list]] = {}
            for info, v in zip(infos, values):
                dense = v.todense() if isinstance(v, RowSparseArray) else v
                flat = np.ascontiguousarray(_as_host(dense)).reshape(-1)
                for sh in info.shards:
                    items, frames = per_server.setdefault(sh.server, ([], []))
                    items.append([info.kid, sh.part, info.dtype.name, list(sh.shape),
                                  info.name if isinstance(info.name, str) else None])
                    frames.append(flat[sh.lo:sh.hi])
            reqs = [self._send(s, {"op": "init", "items": it}, fr, what=f"init of keys {keys!r}")
                    for s, (it, fr) in per_server.items()]
            self._wait(reqs, f"init of keys {keys!r}")
        for k, info in zip(keys, infos):
            self._keys[k] = info
        self.barrier(what=f"the barrier after init of keys {keys!r}")

    def _reduced(self, info: KeyInfo, vals: list) -> Any:
        """One host array (or RowSparseArray) holding the sum of a key's pushed values."""
        if all(isinstance(v, RowSparseArray) for v in vals):
            merged = sum_row_sparse(vals)
            if array_module(merged.data) is not np:
                merged = RowSparseArray(merged.data.get(), merged.indices.get(), merged.shape)
            return merged
        vals = [v.todense() if isinstance(v, RowSparseArray) else v for v in vals]
        if len(vals) == 1:
            v = _as_host(vals[0])
            return v if v.flags.c_contiguous else np.ascontiguousarray(v)
        if self.device_reduce and array_module(vals[0]) is not np:
            xp = array_module(vals[0])
            dev = xp.empty(info.shape, info.dtype)
            self.reducer.sum_into(dev, vals)  # sum on the device, then one copy to the host
            return dev.get()
        buf = self._buffers.get(info.kid)
        if buf is None:
            buf = self._buffers[info.kid] = np.empty(info.shape, info.dtype)
        return self.reducer.sum_into(buf, [_as_host(v) for v in vals])

    def _push_segment(self, info: KeyInfo, sh: Shard, nbytes: int) -> list | None:
        """This worker's shared-memory file for a shard, or None while the server has not consumed
        the previous push from it (its round is still open: that push then goes over the socket)."""
        slot = self._push_segs.get((info.kid, sh.part))
        if slot is None:
            seg = Segment(self.shm, f"w{self._rank}-k{info.kid}-p{sh.part}", nbytes, create=True)
            slot = self._push_segs[(info.kid, sh.part)] = [seg, 0]
        if slot[1] > 0:
            self._drain(0)
        return slot if slot[1] == 0 else None

    def _push_items(self, keys: list, values: list[list]) -> dict[int, tuple[list, list]]:
        if len(set(keys)) == len(keys):
            pairs: Any = zip(keys, values)
        else:  # a key repeated in one call: its values are summed
            grouped: dict = {}
            for k, vals in zip(keys, values):
                grouped.setdefault(k, []).extend(vals)
            pairs = grouped.items()
        per_server: dict[int, tuple[list, list]] = {}
        infos = self._keys
        plain = self._compressor is None
        for k, vals in pairs:
            info = infos[k]
            v = vals[0]
            if plain and info.raw_item is not None and len(vals) == 1 and type(v) is np.ndarray \
                    and v.flags.c_contiguous and (self.shm is None or v.nbytes < MIN_BYTES):
                entry = per_server.get(info.shards[0].server)  # the common case: one array, one server
                if entry is None:
                    entry = per_server[info.shards[0].server] = ([], [])
                entry[0].append(info.raw_item)
                entry[1].append(v.reshape(-1))
                continue
            merged = self._reduced(info, vals)
            if isinstance(merged, RowSparseArray):
                for sh in info.shards:
                    sel = (merged.indices >= sh.row_lo) & (merged.indices < sh.row_hi)
                    rows = np.ascontiguousarray(merged.indices[sel] - sh.row_lo, dtype=np.int64)
                    data = np.ascontiguousarray(merged.data[sel])
                    items, frames = per_server.setdefault(sh.server, ([], []))
                    items.append([info.kid, sh.part, "rsp"])
                    frames.extend([rows, data.reshape(-1)])
                continue
            flat = merged.reshape(-1)
            for sh in info.shards:
                items, frames = per_server.setdefault(sh.server, ([], []))
                part = flat[sh.lo:sh.hi]
                if self._compressor is not None:
                    res = self._residuals.get((info.kid, sh.part))
                    if res is None:
                        res = self._residuals[(info.kid, sh.part)] = np.zeros(sh.hi - sh.lo, info.dtype)
                    payload = np.ascontiguousarray(_as_host(self._compressor.encode(part, res)))
                    items.append([info.kid, sh.part, "comp", dtype_name(payload.dtype)])
                    frames.append(payload.reshape(-1))
                elif self.shm is not None and part.nbytes >= MIN_BYTES and \
                        (slot := self._push_segment(info, sh, part.nbytes)) is not None:
                    np.copyto(slot[0].array(info.dtype, (part.size,)), part)
                    items.append([info.kid, sh.part, "shm", slot[0].name])
                    slot[1] += 1  # busy until the server says it consumed it
                else:
                    items.append([info.kid, sh.part, "raw"])
                    frames.append(part)
        return per_server

    def _batch_push(self, per_server: dict[int, tuple[list, list]]) -> dict[int, list]:
        """Local jobs: a server's many small raw shards of one call go through one shared-memory file
        of this worker (while the server has not consumed the previous one, over the socket)."""
        batches: dict[int, list] = {}
        if self.shm is None or self._compressor is not None:
            return batches
        for s, (items, frames) in per_server.items():
            if len(frames) < 2 or len(frames) != len(items) or not all(len(it) == 3 and it[2] == "raw" for it in items):
                continue
            sizes = [f.nbytes for f in frames]
            total = sum(align8(n) for n in sizes)
            if total < BATCH_MIN:
                continue
            slot = self._batch_segs.get(s)
            if slot is not None and slot[2]:
                self._drain(0)
                if slot[2]:
                    continue
            if slot is None or slot[1] < total:
                gen = 0 if slot is None else slot[3] + 1
                if slot is not None:
                    slot[0].close()
                size = (total + 65535) & ~65535
                seg = Segment(self.shm, f"w{self._rank}-b{s}-g{gen}", size, create=True)
                slot = self._batch_segs[s] = [seg, size, 0, gen]
            dt = frames[0].dtype
            if total == sum(sizes) and all(f.dtype == dt for f in frames):  # no padding, one dtype: one copy
                np.concatenate(frames, out=np.frombuffer(slot[0].mm, dt, total // dt.itemsize))
            else:
                mv = memoryview(slot[0].mm)
                off = 0
                for f, n in zip(frames, sizes):
                    mv[off:off + n] = memoryview(f).cast("B")
                    off = align8(off + n)
                del mv
            slot[2] = 1  # busy until the server says every shard's round used it
            frames.clear()
            batches[s] = [slot[0].name, *sizes]
        return batches

    def push(self, keys: list, values: list[list], priority: int = 0) -> None:
        self._check_failure()
        self._raise_late_errors()
        per_server = self._push_items(keys, values)
        batches = self._batch_push(per_server)
        trackers: list = []
        what = f"push of keys {_keys_text(keys)}"
        for s, (items, frames) in per_server.items():
            rid = next(self._ids)
            self._unconfirmed[rid] = (s, what)
            header = _items({"op": "push", "sync": self.sync, "id": rid}, items, _RAW)
            if s in batches:
                header["shmb"] = batches[s]
            if priority:
                header["prio"] = int(priority)
            trackers.extend(self.transport.send(self.servers[s], header, frames, track=True))
        self._wait_trackers(trackers, what)
        if len(self._unconfirmed) > 4096:  # bound what may be in flight unconfirmed
            self._flush("confirming pushes")

    def _server_array(self, server: int, info: KeyInfo, sh: Shard, name: Any) -> tuple[Segment, np.ndarray]:
        expected = f"s{server}-k{info.kid}-p{sh.part}"
        if name != expected or self.shm is None:
            raise ValueError(f"shared memory {name!r} refused (expected {expected!r})")
        got = self._server_segs.get(name)
        if got is None:
            nbytes = (sh.hi - sh.lo) * info.dtype.itemsize
            seg = Segment(self.shm, name, nbytes, create=False, offset=HEADER)
            got = self._server_segs[name] = (seg, seg.array(info.dtype, (sh.hi - sh.lo,)))
        return got

    def _placer(self, targets: list[tuple[KeyInfo, Shard, list]], server: int = -1):
        """Reply handler writing each item's frame into the flat views of its outputs."""
        def on_data(h: dict, frames: list) -> None:
            if "shmb" in h:
                return self._place_bank(server, h["shmb"], targets, frames)
            if "enc" in h:
                return self._place_compressed(h["enc"], targets, frames)
            if "shm" not in h:  # every value came as a frame
                if len(frames) != len(targets):
                    raise ValueError(f"{len(frames)} frames for {len(targets)} items")
                for (info, sh, views), frame in zip(targets, frames):
                    arr = np.frombuffer(frame.buffer, dtype=info.dtype)
                    if arr.size != sh.hi - sh.lo:
                        raise ValueError(f"key {info.name!r}: {arr.size} values for a shard of {sh.hi - sh.lo}")
                    for v in views:
                        np.copyto(v[sh.lo:sh.hi], arr)
                return
            names = h["shm"]
            if not isinstance(names, list) or len(names) != len(targets) \
                    or len(frames) != sum(n is None for n in names):
                raise ValueError(f"{len(frames)} frames for {len(targets)} items")
            frames = iter(frames)
            for (info, sh, views), name in zip(targets, names):
                if name is not None:
                    seg, src = self._server_array(server, info, sh, name)
                    seg.read_into(src, [v[sh.lo:sh.hi] for v in views], self.timeout)
                    continue
                arr = np.frombuffer(next(frames).buffer, dtype=info.dtype)
                if arr.size != sh.hi - sh.lo:
                    raise ValueError(f"key {info.name!r}: {arr.size} values for a shard of {sh.hi - sh.lo}")
                for v in views:
                    np.copyto(v[sh.lo:sh.hi], arr)
        return on_data

    def _place_bank(self, server: int, where: Any, targets: list, frames: list) -> None:
        """A reply naming consecutive shards in one of the server's bank files: ``[name, lo, hi]``."""
        if frames or not isinstance(where, list) or len(where) != 3 or not isinstance(where[0], str) \
                or type(where[1]) is not int or type(where[2]) is not int or self.shm is None:
            raise ValueError(f"malformed shared-memory reply {str(where)[:80]!r}")
        name, lo, hi = where
        if not re.fullmatch(rf"s{server}-b\d+", name):
            raise ValueError(f"shared memory {name!r} refused (expected s{server}-bN)")
        got = self._server_segs.get(name)
        if got is None:
            seg = Segment(self.shm, name, None, create=False, offset=HEADER)
            got = self._server_segs[name] = (seg, None)
        seg = got[0]
        if not 0 <= lo <= hi <= seg.nbytes:
            raise ValueError(f"shared memory {name!r}: bytes [{lo}, {hi}) outside its {seg.nbytes}")
        srcs = self._bank_srcs
        pairs = []
        off = lo
        for info, sh, views in targets:
            n = sh.hi - sh.lo
            sk = (name, off, info.dtype, n)
            src = srcs.get(sk)
            if src is None:
                if off + n * info.dtype.itemsize > hi:
                    raise ValueError(f"shared memory {name!r}: bytes [{lo}, {hi}) do not hold the pulled values")
                src = srcs[sk] = np.frombuffer(seg.mm, info.dtype, n, HEADER + off)
            pairs.append((src, views if sh.lo == 0 and len(views) == 1 and views[0].size == n
                          else [v[sh.lo:sh.hi] for v in views]))
            off += align8(n * info.dtype.itemsize)
        if off != hi:
            raise ValueError(f"shared memory {name!r}: bytes [{lo}, {hi}) do not match the pulled values")
        seg.read_many(pairs, self.timeout)

    def _place_compressed(self, encs: Any, targets: list, frames: list) -> None:
        if not isinstance(encs, list) or len(encs) != len(targets) or len(frames) != len(targets):
            raise ValueError(f"{len(frames)} frames for {len(targets)} items")
        for (info, sh, views), enc, frame in zip(targets, encs, frames):
            slot = (info.kid, sh.part)
            if enc == "raw":
                value = np.frombuffer(frame.buffer, dtype=info.dtype)
                if value.size != sh.hi - sh.lo:
                    raise ValueError(f"key {info.name!r}: {value.size} values for a shard of {sh.hi - sh.lo}")
                mirror = self._mirrors[slot] = value.copy()
            elif isinstance(enc, str) and enc.startswith("comp:") and slot in self._mirrors:
                mirror = self._mirrors[slot]
                payload = np.frombuffer(frame.buffer, dtype=wire_dtype(enc[5:]))
                self._compressor.decode(payload, mirror, accumulate=True)
            else:
                raise ValueError(f"key {info.name!r}: unexpected pull encoding {enc!r}")
            for v in views:
                np.copyto(v[sh.lo:sh.hi], mirror)

    def _outs_plan(self, keys: list, outs: list[list]) -> tuple[list, list]:
        """Per key: the flat host views replies are written into, and copies to make afterwards
        (outputs that are not C-contiguous numpy arrays get a staging buffer)."""
        views_per_key, after = [], []
        for k, os_ in zip(keys, outs):
            if len(os_) == 1:
                o = os_[0]
                if type(o) is np.ndarray and o.flags.c_contiguous and o.flags.writeable:
                    views_per_key.append([o.reshape(-1)])
                    continue
            info = self._keys[k]
            views = []
            staging = None
            for o in os_:
                if isinstance(o, np.ndarray) and o.flags.c_contiguous and o.flags.writeable:
                    views.append(o.reshape(-1))
                else:
                    if staging is None:
                        staging = np.empty(info.shape, info.dtype)
                        views.append(staging.reshape(-1))
                    after.append((o, staging))
            views_per_key.append(views)
        return views_per_key, after

    @staticmethod
    def _copy_after(after: list) -> None:
        for o, staging in after:
            if isinstance(o, RowSparseArray):  # pull(ignore_sparse=False): every row
                o.data, o.indices = staging.copy(), np.arange(staging.shape[0], dtype=np.int64)
            elif isinstance(o, np.ndarray):
                o[...] = staging
            else:
                o.set(staging) if hasattr(o, "set") else o.__setitem__(Ellipsis, staging)

    def _requests_for(self, op: str, keys: list, outs: list[list], per_server_push: dict | None,
                      what: str, priority: int = 0, batches: dict | None = None) -> tuple[list[Request], list]:
        views_per_key, after = self._outs_plan(keys, outs)
        targets: dict[int, list] = {}
        items: dict[int, list] = {}
        seen = set()
        infos = self._keys
        for k, views in zip(keys, views_per_key):
            info = infos[k]
            if op == "pull":
                if k in seen:  # a key pulled twice in one call: one request, both outputs
                    for t in targets.values():
                        for ti in t:
                            if ti[0] is info:
                                ti[2].extend(views)
                    continue
                seen.add(k)
            for sh, item in zip(info.shards, info.pull_items):
                t = targets.get(sh.server)
                if t is None:
                    t = targets[sh.server] = []
                    items[sh.server] = []
                t.append((info, sh, views))
                items[sh.server].append(item)
        reqs = []
        for s in targets:
            if per_server_push is not None:
                pitems, frames = per_server_push.get(s, ([], []))
                header = _items({"op": "pushpull", "sync": self.sync}, pitems, _RAW)
                if batches and s in batches:
                    header["shmb"] = batches[s]
            else:
                pitems = None
                header, frames = _items({"op": "pull", "sync": self.sync}, items[s], _WHOLE), []
            if priority:
                header["prio"] = int(priority)
            if self.config.compress_pulls and self._compressor is not None:
                header["cpull"] = 1
            elif self.shm is not None and self.sync:
                header["shm"] = 1
            reqs.append(self._send(s, header, frames, what=what, on_data=self._placer(targets[s], s)))
        return reqs, after

    def pull(self, keys: list, outs: list[list], priority: int = 0, ignore_sparse: bool = True) -> Handle:
        self._check_failure()
        what = f"pull of keys {_keys_text(keys)}"
        reqs, after = self._requests_for("pull", keys, outs, None, what, priority)
        return DistHandle(self, reqs, what, (lambda: self._copy_after(after)) if after else None)

    def pushpull(self, keys: list, values: list[list], outs: list[list], priority: int = 0) -> Handle:
        self._check_failure()
        self._raise_late_errors()
        if len(set(keys)) != len(keys):  # repeated keys: sum first, then one pull per key
            self.push(keys, values, priority)
            return self.pull(keys, outs, priority)
        per_server = self._push_items(keys, values)
        batches = self._batch_push(per_server)
        what = f"pushpull of keys {_keys_text(keys)}"
        # every server holding a pushed shard also answers with its values
        reqs, after = self._requests_for("pushpull", keys, outs, per_server, what, priority, batches)
        return DistHandle(self, reqs, what, (lambda: self._copy_after(after)) if after else None)

    def broadcast(self, keys: list, values: list[list], outs: list[list], priority: int = 0) -> Handle:
        self.init(keys, [v[0] for v in values])
        return self.pull(keys, outs, priority)

    def row_sparse_pull(self, keys: list, outs: list[list], row_ids: list[list], priority: int = 0) -> Handle:
        self._check_failure()
        what = f"row_sparse_pull of keys {keys!r}"
        reqs = []
        fills = []
        for k, os_, ids in zip(keys, outs, row_ids):
            info = self._info(k)
            row_size = int(np.prod(info.shape[1:])) if len(info.shape) > 1 else 1
            for o, r in zip(os_, ids):
                rows = np.unique(_as_host(r).astype(np.int64, copy=False))
                parts: list = [None] * len(info.shards)
                for i, sh in enumerate(info.shards):
                    sel = rows[(rows >= sh.row_lo) & (rows < sh.row_hi)]

                    def on_data(h, frames, i=i, n=sel.size, info=info, parts=parts, row_size=row_size):
                        arr = np.frombuffer(frames[0].buffer, dtype=info.dtype)
                        if len(frames) != 1 or arr.size != n * row_size:
                            raise ValueError(f"key {info.name!r}: {arr.size} values for {n} rows")
                        parts[i] = arr.reshape((n,) + info.shape[1:])
                    reqs.append(self._send(sh.server, {"op": "rsp_pull", "items": [[info.kid, sh.part]]},
                                           [np.ascontiguousarray(sel - sh.row_lo)], what=what, on_data=on_data))
                fills.append((o, rows, parts))

        def finish():
            for o, rows, parts in fills:
                data = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
                xp = array_module(o.data)
                o.data = data if xp is np else xp.asarray(data)
                o.indices = rows if xp is np else xp.asarray(rows)
        return DistHandle(self, reqs, what, finish)

    # updates --------------------------------------------------------------------------------
    def _all_servers(self, header: dict, what: str, frames_per_server: list | None = None) -> list[Request]:
        reqs = [self._send(s, dict(header), frames_per_server[s] if frames_per_server else [], what=what,
                           on_data=(lambda h, f: None) if header["op"] != "get_states" else None)
                for s in range(self.num_servers)]
        self._wait(reqs, what)
        return reqs

    def set_updater(self, updater: Any) -> None:
        raise NotSupportedError("dist stores run the optimizer on the servers, which cannot receive a Python updater "
                                "(nothing is pickled): use set_optimizer with an optimizer name or config")

    def set_optimizer(self, optimizer: Any) -> None:
        self._check_failure()
        config = getattr(optimizer, "config", None)
        if config is None or not hasattr(config, "model_dump_json"):
            raise NotSupportedError("dist stores send the optimizer's validated config to the servers; this optimizer "
                                    f"object ({type(optimizer).__name__}) has no pydantic .config")
        if self._rank == 0:
            self._all_servers({"op": "set_optimizer", "config": config.model_dump_json()}, "set_optimizer")
        if not self.sync:
            self.barrier(what="the barrier after set_optimizer")

    def set_gradient_compression(self, compressor: Any) -> None:
        self._check_failure()
        self._compressor = compressor
        self._residuals.clear()
        self._mirrors.clear()
        if self._rank == 0:
            self._all_servers({"op": "set_compression", "config": compressor.config.model_dump_json()},
                              "set_gradient_compression")
        self.barrier(what="the barrier after set_gradient_compression")

    def get_optimizer_states(self, dump_optimizer: bool = False) -> bytes:
        self._check_failure()
        self._flush("the pushes before save_optimizer_states")
        reqs = [self._send(s, {"op": "get_states", "dump_optimizer": dump_optimizer}, what="save_optimizer_states",
                           on_data=lambda h, f: None) for s in range(self.num_servers)]
        blobs: list[bytes] = [b""] * self.num_servers
        for r in reqs:
            r.on_data = (lambda h, f, s=r.server: blobs.__setitem__(s, f[0].bytes))
        self._wait(reqs, "save_optimizer_states (gathering every server's states)")
        return pack_states(blobs, {"store": type(self).__name__, "num_servers": self.num_servers})

    def set_optimizer_states(self, data: bytes) -> None:
        self._check_failure()
        meta, blobs = unpack_states(data)
        if len(blobs) != self.num_servers:
            raise ValueError(f"the optimizer states were saved from {len(blobs)} servers; this job has "
                             f"{self.num_servers}: restart with the same number of servers")
        self._flush("the pushes before load_optimizer_states")
        self._all_servers({"op": "set_states"}, "load_optimizer_states", [[b] for b in blobs])

    # control --------------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None, what: str = "the barrier") -> None:
        self._check_failure()
        self._flush(f"the pushes before {what}")
        self._to_scheduler({"op": "barrier"}, f"{what} (every worker must reach it)", timeout)

    def send_command_to_servers(self, head: int, body: str) -> None:
        self._check_failure()
        self._all_servers({"op": "command", "head": head, "body": body}, f"command {head} to the servers")

    def server_stats(self) -> list[dict]:
        """Each server's counters (pushes, pulls, dropped messages, errors, commands, optimizer)."""
        reqs = [self._send(s, {"op": "stats"}, what="stats") for s in range(self.num_servers)]
        self._wait(reqs, "server stats")
        return [r.result["stats"] for r in reqs]

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._failure is None and (self._hb is None or self._hb.failure is None):
                try:
                    self._flush("the pushes before close")
                except Exception as exc:
                    log.warning("worker %d: %s", self._rank, exc)
                self._to_scheduler({"op": "bye", "role": "worker", "rank": self._rank}, "close",
                                   timeout=min(self.timeout, 30))
        except Exception as exc:
            log.warning("worker %d: close: %s", self._rank, exc)
        finally:
            self._closed = True
            if self._hb is not None:
                self._hb.stop()
                self._hb.join(5)
            for s in self.servers:
                s.close(linger=0)
            for slot in self._push_segs.values():
                slot[0].close()
            self._bank_srcs.clear()
            for seg, _ in self._server_segs.values():
                seg.close()
            for slot in self._batch_segs.values():
                slot[0].close()
            self.sched.close(linger=1000)
            self.reducer.close()
            self.transport.close()


class DistSyncStore(DistStore):
    sync = True


class DistDeviceSyncStore(DistStore):
    sync = True
    device_reduce = True


class DistAsyncStore(DistStore):
    sync = False


__all__ = ["DistStore", "DistSyncStore", "DistDeviceSyncStore", "DistAsyncStore", "DistSyncConfig",
           "DistDeviceSyncConfig", "DistAsyncConfig", "json"]
