"""The worker side of ``dist_sync``, ``dist_device_sync`` and ``dist_async``: KV semantics only.

A call sends one message per server holding any of its key shards (where each shard lives is the
sharding plan's business), then gathers the replies by request id (the request tracker's). Pushes
are not answered one by one. A pull after a push is answered by the server when that push's round
completes, so ``pushpull`` is one round trip. The transport is whatever plugin the job names.
"""

from __future__ import annotations

import atexit
import logging
import sys
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvframe import timeline
from kvframe.arrays import Array, RowSparseArray, array_module
from kvframe.backend import DEFAULT_TIMEOUT, Handle, Keys, PerKey, StoreBackend
from kvframe.errors import KVTimeoutError, NotSupportedError, RemoteError, TransportError
from kvframe.log import configure as configure_logging
from kvframe.reduce import Reducer, sum_row_sparse
from kvframe_dist.configs import DistConfig
from kvframe_dist.endpoint import Endpoint, role_transport
from kvframe_dist.env import NodeEnv, node_env, role_from_env
from kvframe_dist.membership import Heartbeat, register
from kvframe_dist.requests import Request, Requests
from kvframe_dist.sharding import Shard, dtype_name, plan, wire_dtype
from kvframe_dist.states import pack_states, unpack_states
from kvframe_dist.wire import Message, items

log = logging.getLogger("kvframe_dist.worker")


@dataclass
class KeyInfo:
    kid: int  # the key's id on the wire (str keys: their init order)
    name: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    shards: list[Shard]


def _keys_text(keys: list) -> str:
    """Keys for a message, short for long lists."""
    if len(keys) <= 6:
        return repr(keys)
    return f"[{keys[0]!r}, {keys[1]!r}, ..., {keys[-1]!r}] ({len(keys)} keys)"


def _frames_bytes(frames: Any) -> int:
    return sum(int(getattr(f, "nbytes", None) or len(f)) for f in frames)


def _as_host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


class DistHandle(Handle):
    def __init__(self, store: DistStore, reqs: list[Request], what: str, finish: Callable[[], None] | None = None):
        self._store, self._reqs, self._what, self._finish = store, reqs, what, finish
        self._finished = False

    def wait(self, timeout: float | None = None) -> None:
        if self._finished:
            return
        with timeline.span("wait", what=self._what, requests=len(self._reqs)):  # replies of every server
            self._store._wait(self._reqs, self._what, timeout)
        self._finished = True
        if self._finish is not None:
            self._finish()

    def done(self) -> bool:
        if not self._finished:
            self._store._pump(0)
        return self._finished or all(r.done for r in self._reqs)


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
        configure_logging("worker")  # KVFRAME_LOG_LEVEL
        if config.transport is not None:
            env.transport = config.transport
        self.env = env
        self.timeout = config.timeout or DEFAULT_TIMEOUT
        self.bound = config.bigarray_bound or env.bigarray_bound
        self.reducer = Reducer(config.reduce_threads, self.bound)
        self._closed = False
        self._failure: str | None = None
        self._keys: dict[Any, KeyInfo] = {}
        self._str_ids: dict[str, int] = {}
        self._buffers: dict[int, np.ndarray] = {}
        self._residuals: dict[tuple[int, int], Any] = {}
        self._mirrors: dict[tuple[int, int], np.ndarray] = {}  # compressed pulls: this worker's copy per shard
        self._compressor: Any = None
        self._hb: Heartbeat | None = None
        self.ep = Endpoint(role_transport(env), env.secret, "worker", env.mac_data)
        self.requests = Requests("worker")
        try:
            log.debug("worker: connecting to the scheduler at %s (transport %s)", env.scheduler_addr, env.transport)
            self.sched = self.ep.connect_to(env.root_uri, env.root_port)
            welcome = register(self.ep, self.sched, env, "worker")
            self._rank = welcome["rank"]
            self._num_workers = welcome["num_workers"]
            self.server_addrs: list[str] = list(welcome["servers"])
            self.scheduler_pid = welcome["pid"]
            self.ep.owner = self.requests.owner = f"worker {self._rank}"
            timeline.name_process("worker", self._rank)
            log.debug("worker %d: registered (%d workers); servers at %s", self._rank, self._num_workers,
                      self.server_addrs)
            self.servers: list[Hashable] = [self.ep.connect(a) for a in self.server_addrs]
            log.debug("worker %d: connected to %d servers", self._rank, len(self.servers))
            self._server_of = {peer: i for i, peer in enumerate(self.servers)}
            self._hb = Heartbeat(env, "worker", self._rank, on_failure=self.ep.close)
        except BaseException:
            self.ep.close()
            raise
        self._hb.start()
        ref = weakref.ref(self)

        def close_at_exit() -> None:  # holds the store weakly
            store = ref()
            if store is not None:
                store.close()

        atexit.register(close_at_exit)

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

    def transport_info(self) -> dict:
        """Which transport this worker uses, and the peers it reaches through shared memory."""
        peers = getattr(self.ep.transport, "shared_memory_peers", None)
        shared = [self.ep.name(p) for p in peers()] if peers is not None else []
        return {"transport": self.env.transport, "servers": list(self.server_addrs), "shared_memory_peers": shared}

    # messaging ------------------------------------------------------------------------------
    def _where(self, server: int) -> str:
        return f"server {server} at {self.server_addrs[server]}"

    def _check_failure(self, waited: float = 0.0, rounds: bool = False) -> None:
        if self._failure is None and self._hb is not None and self._hb.failure is not None:
            self._failure = self._hb.failure
        if self._failure is not None:
            raise RemoteError(f"worker {self._rank}: {self._failure}")
        if self._closed:
            raise RemoteError(f"worker {self._rank}: the store is closed")
        if rounds and waited > 1.0 and self._hb is not None and self._hb.closed:
            names = ", ".join(sorted(self._hb.closed.values()))
            raise RemoteError(f"worker {self._rank}: cannot complete: {names} closed its store, and a sync round "
                              f"needs a push from each of the {self._num_workers} workers")
        for server in {r.server for r in self.requests.pending.values()}:
            why = self.ep.broken(self.servers[server])
            if why:
                self._lost(server, why)

    def _lost(self, server: int, why: str) -> None:
        """The connection to a server broke. The scheduler's verdict, which comes within the
        heartbeat timeout, names the cause best (a server stops when the scheduler does)."""
        deadline = time.monotonic() + self.env.heartbeat_timeout + 2 * self.env.heartbeat_interval
        while self._hb is not None and self._hb.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._check_failure()
        self._failure = f"lost {self._where(server)}: {why}"
        raise RemoteError(f"worker {self._rank}: {self._failure}")

    def _send(self, server: int, msg: Message) -> None:
        if timeline.enabled:  # KVFRAME_TIMELINE: the send phase, with the bytes sent
            with timeline.span("send", nbytes=_frames_bytes(msg.frames), server=server, op=msg.op,
                               items=len(msg.get("keys") or ())):
                self._send_now(server, msg)
        else:
            self._send_now(server, msg)

    def _send_now(self, server: int, msg: Message) -> None:
        try:
            self.ep.send(self.servers[server], msg)
        except TransportError as exc:
            self._lost(server, f"cannot send {msg.op}: {self.ep.broken(self.servers[server]) or exc}")

    def _request(self, server: int, op: str, fields: dict, frames: Any = (), what: str = "",
                 on_data: Callable[[Message], None] | None = None) -> Request:
        req = self.requests.new(server, what or op, on_data)
        fields["id"] = req.rid
        self._send(server, Message(op, fields, frames))
        return req

    def _pump(self, timeout: float) -> None:
        """Handle every message that is there (waiting up to ``timeout`` s for the first)."""
        try:
            got = self.ep.recv(timeout)
        except TransportError:  # the endpoint was closed: the heartbeat thread knows why
            self._check_failure()
            raise
        while got is not None:
            peer, msg = got
            server = self._server_of.get(peer)
            if server is not None:
                self.requests.answer(server, msg, self._where(server))
            elif peer == self.sched and msg.op == "dead":
                self._failure = f"kvframe dist: {msg['msg']}"
            got = self.ep.recv(0)

    def _wait(self, reqs: list[Request], what: str, timeout: float | None = None) -> None:
        rounds = self.sync and ("pull" in what)
        hint = " (in sync mode a round needs every worker's push)" if rounds else ""
        self.requests.wait(reqs, what, self.timeout if timeout is None else timeout, self._pump,
                           lambda waited: self._check_failure(waited, rounds), self._where, hint)

    def _flush(self, what: str) -> None:
        """Make sure every server has handled this worker's pushes (a ping after them: a server
        answers in order, errors of refused pushes first), and wait for every outstanding request."""
        for s in self.requests.servers_with_unconfirmed():
            self._request(s, "ping", {}, what=f"{what} (server {s} confirming the pushes)")
        if self.requests.pending:
            self._wait(self.requests.all_pending(), what)
        self.requests.forget_confirmed()
        self.requests.raise_late_errors()

    def _to_scheduler(self, op: str, fields: dict, what: str, timeout: float | None = None) -> Message:
        """A request to the scheduler; scheduler messages are read here only (servers' replies that
        come meanwhile are handled as usual)."""
        rid = self.requests.next_id()
        try:
            self.ep.send(self.sched, Message(op, {**fields, "id": rid}))
        except TransportError as exc:  # the heartbeat's verdict names the cause best
            self._check_failure()
            raise RemoteError(f"worker {self._rank}: {what}: cannot reach the scheduler at "
                              f"{self.env.scheduler_addr}: {exc}") from None
        found: list[Message] = []

        def on_message(timeout: float) -> None:
            got = self.ep.recv(timeout)
            while got is not None:
                peer, msg = got
                if peer == self.sched:
                    if msg.op == "dead":
                        self._failure = f"kvframe dist: {msg['msg']}"
                    elif msg.get("id") == rid:
                        found.append(msg)
                elif peer in self._server_of:
                    self.requests.answer(self._server_of[peer], msg, self._where(self._server_of[peer]))
                got = self.ep.recv(0)

        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not found:
            self._check_failure()
            left = deadline - time.monotonic()
            if left <= 0:
                raise KVTimeoutError(f"worker {self._rank}: timed out after {limit:g} s waiting for {what} "
                                     f"(scheduler at {self.env.scheduler_addr})")
            on_message(min(left, 0.1))
        msg = found[0]
        if msg.op == "error":
            raise RemoteError(f"worker {self._rank}: {what} failed: {msg['msg']}")
        return msg

    # keys -----------------------------------------------------------------------------------
    def _new_info(self, key: Any, value: Any) -> KeyInfo:
        kid = self._str_ids.setdefault(key, len(self._str_ids)) if isinstance(key, str) else key
        shape = tuple(int(s) for s in value.shape)
        dtype = np.dtype(value.dtype)
        dtype_name(dtype)
        return KeyInfo(kid, key, shape, dtype, plan(kid, shape, self.num_servers, self.bound))

    # data -----------------------------------------------------------------------------------
    def init(self, keys: Keys, values: list[Array]) -> None:
        self._check_failure()
        infos = [self._new_info(k, v) for k, v in zip(keys, values)]
        if self._rank == 0:
            per_server: dict[int, dict] = {}
            for info, v in zip(infos, values):
                dense = v.todense() if isinstance(v, RowSparseArray) else v
                flat = np.ascontiguousarray(_as_host(dense)).reshape(-1)
                for sh in info.shards:
                    cols = per_server.setdefault(sh.server, {"keys": [], "parts": [], "dtypes": [], "shapes": [],
                                                             "names": [], "frames": []})
                    cols["keys"].append(info.kid)
                    cols["parts"].append(sh.part)
                    cols["dtypes"].append(info.dtype.name)
                    cols["shapes"].append(list(sh.shape))
                    cols["names"].append(info.name if isinstance(info.name, str) else None)
                    cols["frames"].append(flat[sh.lo:sh.hi])
            what = f"init of keys {_keys_text(keys)}"
            log.debug("worker 0: init of %d keys on %d servers", len(keys), len(per_server))
            reqs = [self._request(s, "init", cols, cols.pop("frames"), what) for s, cols in per_server.items()]
            self._wait(reqs, what)
        for k, info in zip(keys, infos):
            self._keys[k] = info
        self.barrier(what=f"the barrier after init of keys {_keys_text(keys)}")

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

    def _push_shards(self, keys: Keys, values: PerKey) -> dict[int, tuple[list, list]]:
        """Per server: the ``(key, part, enc)`` shards of a push and their data frames."""
        if len(set(keys)) == len(keys):
            pairs: Any = zip(keys, values)
        else:  # a key repeated in one call: its values are summed
            grouped: dict = {}
            for k, vals in zip(keys, values):
                grouped.setdefault(k, []).extend(vals)
            pairs = grouped.items()
        per_server: dict[int, tuple[list, list]] = {}
        comp = self._compressor
        for k, vals in pairs:
            info = self._keys[k]
            if timeline.enabled and len(vals) > 1:  # KVFRAME_TIMELINE: summing the per-device values
                with timeline.span("reduce", key=k, nbytes=timeline.nbytes(vals), devices=len(vals)):
                    merged = self._reduced(info, vals)
            else:
                merged = self._reduced(info, vals)
            if isinstance(merged, RowSparseArray):
                for sh in info.shards:
                    sel = (merged.indices >= sh.row_lo) & (merged.indices < sh.row_hi)
                    rows = np.ascontiguousarray(merged.indices[sel] - sh.row_lo, dtype=np.int64)
                    shards, frames = per_server.setdefault(sh.server, ([], []))
                    shards.append((info.kid, sh.part, "rsp"))
                    frames.extend([rows, np.ascontiguousarray(merged.data[sel]).reshape(-1)])
                continue
            flat = merged.reshape(-1)
            for sh in info.shards:
                shards, frames = per_server.setdefault(sh.server, ([], []))
                part = flat[sh.lo:sh.hi]
                if comp is None:
                    shards.append((info.kid, sh.part, "raw"))
                    frames.append(part)
                    continue
                res = self._residuals.get((info.kid, sh.part))
                if res is None:
                    res = self._residuals[(info.kid, sh.part)] = np.zeros(sh.hi - sh.lo, info.dtype)
                if timeline.enabled:
                    t0 = timeline.now()
                    payload = np.ascontiguousarray(_as_host(comp.encode(part, res))).reshape(-1)
                    timeline.complete("compress", t0, key=k, nbytes=part.nbytes, part=sh.part, out_bytes=payload.nbytes)
                else:
                    payload = np.ascontiguousarray(_as_host(comp.encode(part, res))).reshape(-1)
                shards.append((info.kid, sh.part, f"c:{dtype_name(payload.dtype)}"))
                frames.append(payload)
        return per_server

    def _push_fields(self, shards: list, priority: int) -> dict:
        fields = items({"sync": self.sync}, shards)
        if priority:
            fields["prio"] = int(priority)
        return fields

    def push(self, keys: Keys, values: PerKey, priority: int = 0) -> None:
        self._check_failure()
        self.requests.raise_late_errors()
        what = f"push of keys {_keys_text(keys)}"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("worker %d: push of %d keys %s", self._rank, len(keys), _keys_text(keys))
        for s, (shards, frames) in self._push_shards(keys, values).items():
            fields = self._push_fields(shards, priority)
            fields["id"] = self.requests.push_sent(s, what)
            self._send(s, Message("push", fields, frames))  # returns once the frames' memory is free
        if len(self.requests.unconfirmed) > 4096:  # bound what may be in flight unconfirmed
            self._flush("confirming pushes")

    def _outs_plan(self, keys: Keys, outs: PerKey) -> tuple[list, list]:
        """Per key: the flat host views replies are written into, and copies to make afterwards
        (outputs that are not C-contiguous numpy arrays get a staging buffer)."""
        views_per_key, after = [], []
        for k, os_ in zip(keys, outs):
            info = self._keys[k]
            views = []
            staging = None
            for o in os_:
                if type(o) is np.ndarray and o.flags.c_contiguous and o.flags.writeable:
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

    def _placer(self, targets: list[tuple[KeyInfo, Shard, list]]) -> Callable[[Message], None]:
        """Reply handler writing each item's frame into the flat views of its outputs."""
        def on_data(msg: Message) -> None:
            frames = msg.frames
            encs = msg.get("encs") or ["raw"] * len(targets)
            if len(frames) != len(targets) or len(encs) != len(targets):
                raise ValueError(f"{len(frames)} frames for {len(targets)} items")
            for (info, sh, views), frame, enc in zip(targets, frames, encs):
                n = sh.hi - sh.lo
                if enc == "raw":
                    value = np.frombuffer(frame, dtype=info.dtype)
                    if value.size != n:
                        raise ValueError(f"key {info.name!r}: {value.size} values for a shard of {n}")
                    if msg.get("encs") is not None:  # a compressed pull's exact copy
                        value = self._mirrors[(info.kid, sh.part)] = value.copy()
                elif enc.startswith("c:") and (info.kid, sh.part) in self._mirrors:
                    value = self._mirrors[(info.kid, sh.part)]
                    self._compressor.decode(np.frombuffer(frame, dtype=wire_dtype(enc[2:])), value, accumulate=True)
                else:
                    raise ValueError(f"key {info.name!r}: unexpected pull encoding {enc!r}")
                for v in views:
                    np.copyto(v[sh.lo:sh.hi], value)
        return on_data

    def _pull_requests(self, op: str, keys: Keys, outs: PerKey, pushed: dict | None, what: str,
                       priority: int) -> tuple[list[Request], list]:
        views_per_key, after = self._outs_plan(keys, outs)
        targets: dict[int, list] = {}
        wanted: dict[Any, list] = {}
        for k, views in zip(keys, views_per_key):
            if k in wanted:  # a key pulled twice in one call: one request, both outputs
                wanted[k].extend(views)
                continue
            wanted[k] = views
            info = self._keys[k]
            for sh in info.shards:
                targets.setdefault(sh.server, []).append((info, sh, views))
        cpull = self.config.compress_pulls and self._compressor is not None
        reqs = []
        for s, t in targets.items():
            if pushed is not None:
                shards, frames = pushed.get(s, ([], []))
                fields = self._push_fields(shards, priority)
                if [(i.kid, sh.part) for i, sh, _ in t] != [(k, p) for k, p, _ in shards]:
                    raise AssertionError("pushpull: pulled shards differ from pushed ones")
            else:
                fields = items({"sync": self.sync}, [(i.kid, sh.part, "raw") for i, sh, _ in t])
                if priority:
                    fields["prio"] = int(priority)
                frames = []
            if cpull:
                fields["cpull"] = True
            reqs.append(self._request(s, op, fields, frames, what, self._placer(t)))
        return reqs, after

    def pull(self, keys: Keys, outs: PerKey, priority: int = 0, ignore_sparse: bool = True) -> Handle:
        self._check_failure()
        what = f"pull of keys {_keys_text(keys)}"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("worker %d: pull of %d keys %s", self._rank, len(keys), _keys_text(keys))
        reqs, after = self._pull_requests("pull", keys, outs, None, what, priority)
        return DistHandle(self, reqs, what, (lambda: self._copy_after(after)) if after else None)

    def pushpull(self, keys: Keys, values: PerKey, outs: PerKey, priority: int = 0) -> Handle:
        self._check_failure()
        self.requests.raise_late_errors()
        if len(set(keys)) != len(keys):  # repeated keys: sum first, then one pull per key
            self.push(keys, values, priority)
            return self.pull(keys, outs, priority)
        pushed = self._push_shards(keys, values)
        what = f"pushpull of keys {_keys_text(keys)}"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("worker %d: pushpull of %d keys %s", self._rank, len(keys), _keys_text(keys))
        reqs, after = self._pull_requests("pushpull", keys, outs, pushed, what, priority)
        return DistHandle(self, reqs, what, (lambda: self._copy_after(after)) if after else None)

    def broadcast(self, keys: Keys, values: PerKey, outs: PerKey, priority: int = 0) -> Handle:
        self.init(keys, [v[0] for v in values])
        return self.pull(keys, outs, priority)

    def row_sparse_pull(self, keys: Keys, outs: PerKey, row_ids: PerKey, priority: int = 0) -> Handle:
        """One request per server for every (output, shard) pair; in sync mode each is answered
        after this worker's open rounds of those shards, like a dense pull."""
        self._check_failure()
        what = f"row_sparse_pull of keys {_keys_text(keys)}"
        per_server: dict[int, tuple[list, list, list]] = {}  # server -> shards, row frames, result slots
        fills = []
        for k, os_, ids in zip(keys, outs, row_ids):
            info = self._keys[k]
            for o, r in zip(os_, ids):
                rows = np.unique(_as_host(r).astype(np.int64, copy=False))
                parts: list = [None] * len(info.shards)
                for i, sh in enumerate(info.shards):
                    sel = rows[(rows >= sh.row_lo) & (rows < sh.row_hi)]
                    shards, frames, slots = per_server.setdefault(sh.server, ([], [], []))
                    shards.append((info.kid, sh.part, "raw"))
                    frames.append(np.ascontiguousarray(sel - sh.row_lo))
                    slots.append((parts, i, sel.size, info))
                fills.append((o, rows, parts))

        def placer(slots: list) -> Callable[[Message], None]:
            def on_data(msg: Message) -> None:
                if len(msg.frames) != len(slots):
                    raise ValueError(f"{len(msg.frames)} frames for {len(slots)} items")
                for (parts, i, n, info), frame in zip(slots, msg.frames):
                    arr = np.frombuffer(frame, dtype=info.dtype)
                    row = int(np.prod(info.shape[1:])) if len(info.shape) > 1 else 1
                    if arr.size != n * row:
                        raise ValueError(f"key {info.name!r}: {arr.size} values for {n} rows")
                    parts[i] = arr.reshape((n,) + info.shape[1:])
            return on_data

        reqs = [self._request(s, "rsp_pull", items({"sync": self.sync}, shards), frames, what, placer(slots))
                for s, (shards, frames, slots) in per_server.items()]

        def finish() -> None:
            for o, rows, parts in fills:
                data = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
                xp = array_module(o.data)
                o.data = data if xp is np else xp.asarray(data)
                o.indices = rows if xp is np else xp.asarray(rows)
        return DistHandle(self, reqs, what, finish)

    # updates --------------------------------------------------------------------------------
    def _all_servers(self, op: str, fields: dict, what: str, frames_per_server: list | None = None) -> list[Request]:
        reqs = [self._request(s, op, dict(fields), frames_per_server[s] if frames_per_server else [], what)
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
            self._all_servers("set_optimizer", {"config": config.model_dump_json()}, "set_optimizer")
        if not self.sync:
            self.barrier(what="the barrier after set_optimizer")

    def set_gradient_compression(self, compressor: Any) -> None:
        self._check_failure()
        if self.config.compress_pulls and not float(getattr(compressor.config, "threshold", 0) or 0) > 0:
            raise NotSupportedError(
                f"compress_pulls=True needs a compressor with a positive threshold (such as 2bit): a pulled copy is "
                f"kept within one threshold of the server's value; {compressor.config.type!r} has none. Use "
                "compress_pulls=False (pushes are still compressed)")
        self._compressor = compressor
        self._residuals.clear()
        self._mirrors.clear()
        if self._rank == 0:
            self._all_servers("set_compression", {"config": compressor.config.model_dump_json()},
                              "set_gradient_compression")
        self.barrier(what="the barrier after set_gradient_compression")

    def get_optimizer_states(self, dump_optimizer: bool = False) -> bytes:
        self._check_failure()
        self._flush("the pushes before save_optimizer_states")
        blobs: list[bytes] = [b""] * self.num_servers
        what = "save_optimizer_states (gathering every server's states)"

        def keep(s: int) -> Callable[[Message], None]:
            return lambda m: blobs.__setitem__(s, bytes(m.frames[0]))

        reqs = [self._request(s, "get_states", {"dump": bool(dump_optimizer)}, (), what, keep(s))
                for s in range(self.num_servers)]
        self._wait(reqs, what)
        return pack_states(blobs, {"store": type(self).__name__, "num_servers": self.num_servers})

    def set_optimizer_states(self, data: bytes) -> None:
        self._check_failure()
        meta, blobs = unpack_states(data)
        if len(blobs) != self.num_servers:
            raise ValueError(f"the optimizer states were saved from {len(blobs)} servers; this job has "
                             f"{self.num_servers}: restart with the same number of servers")
        self._flush("the pushes before load_optimizer_states")
        self._all_servers("set_states", {}, "load_optimizer_states", [[b] for b in blobs])

    # control --------------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None, what: str = "the barrier") -> None:
        self._check_failure()
        with timeline.span("barrier", what=what):
            self._flush(f"the pushes before {what}")
            log.debug("worker %d: waiting at %s", self._rank, what)
            t0 = time.monotonic()
            self._to_scheduler("barrier", {}, f"{what} (every worker must reach it)", timeout)
        log.debug("worker %d: passed %s after %.3f s", self._rank, what, time.monotonic() - t0)

    def send_command_to_servers(self, head: int, body: str) -> None:
        self._check_failure()
        self._all_servers("command", {"head": int(head), "body": str(body)}, f"command {head} to the servers")

    def server_stats(self) -> list[dict]:
        """Each server's counters (pushes, pulls, dropped messages, errors, commands, optimizer)."""
        reqs = self._all_servers("stats", {}, "server stats")
        return [r.result["stats"] if r.result is not None else {} for r in reqs]

    def close(self) -> None:
        if self._closed:
            return
        log.debug("worker %d: closing the store", self._rank)
        try:
            if self._failure is None and (self._hb is None or self._hb.failure is None):
                try:
                    self._flush("the pushes before close")
                except Exception as exc:
                    log.warning("worker %d: %s", self._rank, exc)
                self._to_scheduler("bye", {"role": "worker", "rank": self._rank}, "close",
                                   timeout=min(self.timeout, 30))
        except Exception as exc:
            log.warning("worker %d: close: %s", self._rank, exc)
        finally:
            self._closed = True
            if self._hb is not None:
                self._hb.stop()
                self._hb.join(5)
            self.ep.close()
            self.reducer.close()
            log.debug("worker %d: closed", self._rank)
            timeline.flush()


class DistSyncStore(DistStore):
    sync = True


class DistDeviceSyncStore(DistStore):
    sync = True
    device_reduce = True


class DistAsyncStore(DistStore):
    sync = False


__all__ = ["DistStore", "DistSyncStore", "DistDeviceSyncStore", "DistAsyncStore"]
