"""A server: holds key shards, sums the workers' pushes and applies the optimizer.

Sync mode (``dist_sync``, ``dist_device_sync``): pushes of a shard are summed until
``num_workers`` have arrived (a second push from one worker counts, as in MXNet), then the
optimizer runs on the sum (or the sum is stored when there is none).  A pull from a worker whose
push of that shard is still waiting for the round is answered when the round completes, so a
pull after a push sees that round's result without an extra round trip.  Async mode applies each
push at once and needs an optimizer.

The optimizer arrives as a validated JSON config and is built from this process's installed
plugins; nothing received is unpickled.  Malformed, unauthenticated or wrong requests are logged
and dropped or answered with an error; the server keeps serving.

Run on its own with ``python -m kvframe_dist.server`` (environment as for MXNet).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from kvframe_local.reduce import Reducer

from kvframe.arrays import RowSparseArray
from kvframe_dist.env import NodeEnv, run_role
from kvframe_dist.node import register
from kvframe_dist.proto import wire_dtype
from kvframe_dist.shm import BATCH_MIN, HEADER, MIN_BYTES, Segment, align8, shm_dir
from kvframe_dist.transport import BadMessage, ZmqTransport

log = logging.getLogger("kvframe_dist.server")


class RequestError(Exception):
    """A request the server refuses; the message goes back to the worker."""


@dataclass
class Deferred:
    ident: bytes
    rid: Any
    op: str
    items: list
    waiting: int
    shm: bool = False
    cpull: bool = False


class BatchAck:
    """A worker's push of many small shards through one shared-memory file: the file may be
    written again once every one of those shards' rounds used it."""

    __slots__ = ("ident", "name", "left")

    def __init__(self, ident: bytes, name: str, left: int):
        self.ident, self.name, self.left = ident, name, left


@dataclass
class ShardState:
    key: Any  # the user's key (int or str), given to the optimizer
    data: np.ndarray
    pending: list = field(default_factory=list)  # (ident, enc, frames) of this round
    pushers: list = field(default_factory=list)
    deferred: list = field(default_factory=list)
    merge: np.ndarray | None = None
    trackers: list = field(default_factory=list)
    seg: Segment | None = None  # the value lives in shared memory (local jobs)
    sk: tuple = ()  # (key, part)
    flat: np.ndarray | None = None  # data.reshape(-1)
    acks: list = field(default_factory=list)  # pushes from shared memory waiting for this round
    mirrors: dict = field(default_factory=dict)  # compressed pulls: worker -> the value that worker holds
    bank: Segment | None = None  # small shards of local jobs: the value lives in a shared file of many shards
    bank_off: int = 0  # its byte offset there (after the header)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until no zero-copy reply still reads ``data``."""
        for t in self.trackers:
            if not t.done:
                t.wait(timeout)
        self.trackers.clear()


def _prio(h: dict) -> int:
    p = h.get("prio", 0)
    return p if type(p) is int else 0


def by_priority(batch: list) -> list:
    """The order to serve a burst of requests in: each worker's requests stay in the order it sent
    them; among the workers' next requests the highest ``prio`` goes first (then arrival order)."""
    if len(batch) < 2 or all(_prio(h) == 0 for _, h, _ in batch):
        return batch
    queues: dict[bytes, list] = {}
    for seq, msg in enumerate(batch):
        queues.setdefault(msg[0], []).append((seq, msg))
    heads = {ident: 0 for ident in queues}
    out = []
    while heads:
        ident = max(heads, key=lambda i: (_prio(queues[i][heads[i]][1][1]), -queues[i][heads[i]][0]))
        out.append(queues[ident][heads[ident]][1])
        heads[ident] += 1
        if heads[ident] == len(queues[ident]):
            del heads[ident]
    return out


def load_extra_plugins() -> None:
    """``KVFRAME_PLUGIN_MODULES=a.b,c``: register these modules' plugins in this process too."""
    from kvframe import plugins

    for mod in filter(None, (m.strip() for m in os.environ.get("KVFRAME_PLUGIN_MODULES", "").split(","))):
        plugins.register_plugin(importlib.import_module(mod))


class Server:
    def __init__(self, env: NodeEnv, transport: ZmqTransport | None = None):
        self.env = env
        self.transport = transport or ZmqTransport(secret=env.secret)
        if env.ipc:
            bind = f"ipc://{os.environ.get('TMPDIR', '/tmp')}/kvframe-{env.root_port}-{os.getpid()}.sock"
        else:
            host = env.node_host
            bind = f"tcp://{'*' if host == '0.0.0.0' else host}:{env.port}"
        self.sock, addr = self.transport.router(bind)
        if addr.startswith("tcp://0.0.0.0:") or bind.startswith("tcp://*"):
            import socket

            addr = f"tcp://{socket.gethostbyname(socket.gethostname())}:{addr.rsplit(':', 1)[1]}"
        self.addr = addr
        self.sched = self.transport.dealer(env.scheduler_addr)
        self.rank = -1
        self.num_workers = env.num_workers
        self.shards: dict[tuple[int, int], ShardState] = {}
        self.updater: Any = None
        self.optimizer_config: str | None = None
        self.compressor: Any = None
        self.reducer = Reducer(bigarray_bound=env.bigarray_bound)
        self.commands: list = []
        self.shm_dir = shm_dir()
        self.push_segs: dict[str, Segment] = {}
        self.typed_views: dict[str, tuple] = {}  # batch file -> (Segment, {dtype: the file as that dtype})
        self.banks: list[Segment] = []
        self.consumed: dict[bytes, list] = {}  # batch files used up, told with the next reply to that worker
        self.stats = {"pushes": 0, "pulls": 0, "dropped": 0, "errors": 0}
        self.exit_code: int | None = None

    # replies ---------------------------------------------------------------------------------
    def _reply(self, ident: bytes, header: dict, frames: list = (), track_into: list | None = None) -> None:
        if self.consumed and ident in self.consumed:
            header["consumed"] = self.consumed.pop(ident)
        try:
            trackers = self.transport.send(self.sock, header, frames, ident=ident, track=track_into is not None)
        except zmq.ZMQError as exc:
            log.warning("reply to %r failed: %s", ident, exc)
            return
        if track_into is not None:
            track_into.extend(trackers)

    def _error(self, ident: bytes, rid: Any, msg: str) -> None:
        self.stats["errors"] += 1
        log.warning("refused a request from %r: %s", ident, msg)
        self._reply(ident, {"op": "error", "id": rid, "msg": f"server {self.rank} at {self.addr}: {msg}"})

    # items -----------------------------------------------------------------------------------
    def _shard(self, item: Any) -> tuple[tuple[int, int], ShardState]:
        if type(item) is list and len(item) >= 2 and type(item[0]) is int and type(item[1]) is int:
            st = self.shards.get((item[0], item[1]))
            if st is not None:
                return st.sk, st
            raise RequestError(f"unknown key {item[0]} (part {item[1]}): it was not initialised on this server")
        raise RequestError(f"malformed item {item!r}: expected [key, part, ...]")

    def _array(self, frame: zmq.Frame, dtype: np.dtype, count: int | None, what: str) -> np.ndarray:
        nbytes = len(frame)
        if nbytes % dtype.itemsize:
            raise RequestError(f"{what}: {nbytes} bytes is not a whole number of {dtype.name} values")
        arr = np.frombuffer(frame.buffer, dtype=dtype)
        if count is not None and arr.size != count:
            raise RequestError(f"{what}: got {arr.size} {dtype.name} values ({nbytes} bytes), expected {count}")
        return arr

    # operations ------------------------------------------------------------------------------
    def _init(self, ident: bytes, rid: Any, h: dict, frames: list) -> None:
        items = h.get("items")
        if not isinstance(items, list) or len(items) != len(frames):
            n = len(items) if isinstance(items, list) else 0
            raise RequestError(f"init: {len(frames)} data frames for {n} items")
        new = {}
        small: list = []  # shards that go to one shared bank file
        for item, frame in zip(items, frames):
            if not isinstance(item, list) or len(item) != 5:
                raise RequestError(f"init: malformed item {item!r}: expected [key, part, dtype, shape, name]")
            k, p, dt, shape, name = item
            if not (isinstance(k, int) and isinstance(p, int) and isinstance(shape, list)
                    and all(isinstance(s, int) and s >= 0 for s in shape)):
                raise RequestError(f"init: malformed item {item!r}")
            dtype = wire_dtype(dt)
            count = int(np.prod(shape)) if shape else 1
            arr = self._array(frame, dtype, count, f"init of key {k} part {p}")
            if (k, p) in self.shards:
                raise RequestError(f"duplicate init of key {name if name is not None else k} (part {p})")
            key = name if isinstance(name, str) else k
            if self.shm_dir is not None and arr.nbytes >= MIN_BYTES and (k, p) not in new:
                seg = Segment(self.shm_dir, f"s{self.rank}-k{k}-p{p}", arr.nbytes, create=True, offset=HEADER)
                data = seg.array(dtype, tuple(shape))
                data[...] = arr.reshape(shape)
                new[(k, p)] = ShardState(key, data, seg=seg)
            else:
                new[(k, p)] = ShardState(key, arr.reshape(shape).copy())
                if self.shm_dir is not None and arr.nbytes:
                    small.append((k, p))
        if small:
            self._bank(new, small)
        for sk, st in new.items():
            st.sk, st.flat = sk, st.data.reshape(-1)
        self.shards.update(new)
        self._reply(ident, {"op": "ok", "id": rid})

    def _bank(self, new: dict, small: list) -> None:
        """Small shards initialised together share one file (after a header with a sequence counter),
        in init order: a pull of many of them is answered with the file's name and offsets."""
        total = sum(align8(new[sk].data.nbytes) for sk in small)
        if total < BATCH_MIN:
            return
        bank = Segment(self.shm_dir, f"s{self.rank}-b{len(self.banks)}", total, create=True, offset=HEADER)
        self.banks.append(bank)
        off = 0
        for sk in small:
            st = new[sk]
            data = np.frombuffer(bank.mm, st.data.dtype, st.data.size, HEADER + off).reshape(st.data.shape)
            data[...] = st.data
            st.data, st.bank, st.bank_off = data, bank, off
            off += align8(data.nbytes)

    def _batch_frames(self, ident: bytes, shmb: Any, frames: list) -> tuple[list, tuple]:
        """A push whose small shards came through the worker's batch file: ``[name, nbytes...]``."""
        if self.shm_dir is None or frames or not isinstance(shmb, list) or len(shmb) < 2 \
                or not isinstance(shmb[0], str) or not all(type(n) is int and n >= 0 for n in shmb[1:]):
            raise RequestError(f"push: malformed shared-memory batch {str(shmb)[:80]!r}")
        name = shmb[0]
        prefix = f"{ident.decode(errors='replace')}-b{self.rank}-g"
        if not name.startswith(prefix) or not name[len(prefix):].isdigit():
            raise RequestError(f"push: shared memory {name!r} refused (expected {prefix}N in a local job)")
        seg = self.push_segs.get(name)
        if seg is None:
            for old in [n for n in self.push_segs if n.startswith(prefix)]:  # a worker's older, smaller file
                self.typed_views.pop(old, None)
                self.push_segs.pop(old).close()
            try:
                seg = self.push_segs[name] = Segment(self.shm_dir, name, None, create=False)
            except (OSError, ValueError) as exc:
                raise RequestError(f"push: cannot map shared memory {name!r}: {exc}") from None
        out = []
        off = 0
        for n in shmb[1:]:
            out.append((off, n))
            off = align8(off + n)
        if off > seg.nbytes:
            raise RequestError(f"push: shared-memory batch {name!r} has {seg.nbytes} bytes, {off} are needed")
        return out, (name, seg)

    def _typed(self, seg: Segment, dtype: np.dtype) -> np.ndarray:
        """The whole file as ``dtype`` values (items start at multiples of 8 bytes)."""
        views = self.typed_views.get(seg.name)
        if views is None or views[0] is not seg:
            views = self.typed_views[seg.name] = (seg, {})
        arr = views[1].get(dtype)
        if arr is None:
            arr = views[1][dtype] = np.frombuffer(seg.mm, dtype, seg.nbytes // dtype.itemsize)
        return arr

    def _decode_push(self, st: ShardState, item: list, frames: list, pos: int, ident: bytes) -> tuple[Any, int]:
        """The pushed value of one item: (value, frames used)."""
        enc = item[2] if len(item) > 2 else None
        what = f"push of key {st.key!r} part {item[1]}"
        if enc == "shm":
            name = item[3] if len(item) > 3 else None
            expected = f"{ident.decode(errors='replace')}-k{item[0]}-p{item[1]}"
            if self.shm_dir is None or name != expected:
                raise RequestError(f"{what}: shared memory {name!r} refused (expected {expected!r} in a local job)")
            seg = self.push_segs.get(name)
            if seg is None or seg.nbytes != st.data.nbytes:
                try:
                    seg = self.push_segs[name] = Segment(self.shm_dir, name, st.data.nbytes, create=False)
                except (OSError, ValueError) as exc:
                    raise RequestError(f"{what}: cannot map shared memory {name!r}: {exc}") from None
            return seg.array(st.data.dtype, (st.data.size,)), 0
        if pos >= len(frames):
            raise RequestError(f"{what}: its data frame is missing")
        if enc == "raw":
            return self._array(frames[pos], st.data.dtype, st.data.size, what), 1
        if enc == "comp":
            if self.compressor is None:
                raise RequestError(f"{what}: a compressed push came but no gradient compression is set on the servers")
            pdt = wire_dtype(item[3] if len(item) > 3 else None)
            return ("comp", self._array(frames[pos], pdt, None, what)), 1
        if enc == "rsp":
            if pos + 1 >= len(frames):
                raise RequestError(f"{what}: a row-sparse push needs two frames (rows, data)")
            rows = self._array(frames[pos], np.dtype(np.int64), None, what + " (row ids)")
            row_size = st.data.size // st.data.shape[0] if st.data.shape[0] else 0
            data = self._array(frames[pos + 1], st.data.dtype, rows.size * row_size, what + " (rows)")
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= st.data.shape[0]):
                raise RequestError(f"{what}: row ids outside [0, {st.data.shape[0]})")
            return RowSparseArray.from_rows(data.reshape((rows.size,) + st.data.shape[1:]), rows, st.data.shape), 2
        raise RequestError(f"{what}: unknown encoding {enc!r}")

    def _push(self, ident: bytes, rid: Any, h: dict, frames: list, ack: bool = True) -> list:
        """Queue or apply each item; returns the shard keys that were pushed (for pushpull).
        Items from shared memory are also answered with ``consumed`` once their round used them."""
        items = h.get("items")
        if not isinstance(items, list):
            raise RequestError("push without items")
        sync = bool(h.get("sync", True))
        if not sync and self.updater is None:
            raise RequestError("dist_async needs an optimizer on the servers (updates run per push): call "
                               "set_optimizer before pushing")
        batch = None
        shmb = h.get("shmb")
        if shmb is not None:
            frames, (batch, seg) = self._batch_frames(ident, shmb, frames)
            self._committed = False
            try:
                return self._push_items(ident, rid, h, items, sync, frames, ack, batch, seg)
            except Exception:
                if not self._committed:  # refused before any use: the worker may write its file again
                    self._reply(ident, {"op": "consumed", "batch": batch})
                raise
        return self._push_items(ident, rid, h, items, sync, frames, ack, batch)

    def _push_items(self, ident: bytes, rid: Any, h: dict, items: list, sync: bool, frames: list, ack: bool,
                    batch: str | None, seg: Segment | None = None) -> list:
        decoded = []
        pos = 0
        nframes = len(frames)
        for item in items:  # check everything before changing anything
            _, st = self._shard(item)
            if len(item) == 3 and item[2] == "raw" and pos < nframes:  # the common case, inline
                if seg is not None:  # (offset, bytes) in the worker's batch file
                    off, n = frames[pos]
                    dt = st.data.dtype
                    if n % dt.itemsize:
                        raise RequestError(f"push of key {st.key!r} part {item[1]}: {n} bytes is not a whole "
                                           f"number of {dt.name} values")
                    lo = off // dt.itemsize
                    value = self._typed(seg, dt)[lo:lo + n // dt.itemsize]
                else:
                    value = np.frombuffer(frames[pos].buffer, dtype=st.data.dtype)
                if value.size != st.data.size:
                    raise RequestError(f"push of key {st.key!r} part {item[1]}: got {value.size} "
                                       f"{st.data.dtype.name} values, expected {st.data.size}")
                pos += 1
            else:
                value, used = self._decode_push(st, item, frames, pos, ident)
                pos += used
                if item[2] == "shm":  # tell the worker when its file may be written again
                    st.acks.append(ident)
            decoded.append((st, value))
        if pos != nframes:
            raise RequestError(f"push: {nframes} data frames for {len(items)} items")
        self.stats["pushes"] += 1
        if ack and h.get("ack"):
            self._reply(ident, {"op": "ok", "id": rid})
        need = self.num_workers if sync else 1
        if batch is not None:
            self._committed = True
            b = BatchAck(ident, batch, len(decoded))
            if not decoded:
                self._reply(ident, {"op": "consumed", "batch": batch})
            for st, _ in decoded:
                st.acks.append(b)
        for st, value in decoded:
            st.pending.append(value)
            if sync:
                st.pushers.append(ident)
            if len(st.pending) >= need:
                self._complete(st)
        return [st for st, _ in decoded]

    def _merged(self, st: ShardState) -> Any:
        values = st.pending
        if all(isinstance(v, RowSparseArray) for v in values):
            if len(values) == 1:
                return values[0]
            return RowSparseArray.from_rows(np.concatenate([v.data for v in values]),
                                            np.concatenate([v.indices for v in values]), st.data.shape)
        if st.merge is None:
            st.merge = np.empty_like(st.data)
        flat = st.merge.reshape(-1)
        dense = []
        for v in values:
            if isinstance(v, tuple):  # compressed
                dense.append(v)
            elif isinstance(v, RowSparseArray):
                dense.append(v.todense().reshape(-1))
            else:
                dense.append(v)
        raw = [v for v in dense if not isinstance(v, tuple)]
        comp = [v[1] for v in dense if isinstance(v, tuple)]
        if raw:
            self.reducer.sum_into(flat, raw)
        else:
            flat[...] = 0
        for payload in comp:
            self.compressor.decode(payload, st.merge, accumulate=True)
        return st.merge

    def _complete(self, st: ShardState) -> None:
        """A round of this shard is complete: apply it and answer the pulls waiting for it."""
        if st.trackers:
            st.settle()
        values = st.pending
        seg = st.seg or st.bank
        if seg is not None:
            seg.begin_write()
        try:
            self._apply(st, values)
        finally:
            if seg is not None:
                seg.end_write()
        st.pending = []
        st.pushers = []
        if st.acks:
            acks, st.acks = st.acks, []
            for who in acks:
                if type(who) is BatchAck:
                    who.left -= 1
                    if who.left == 0:
                        self.consumed.setdefault(who.ident, []).append(who.name)
                else:
                    self._reply(who, {"op": "consumed", "items": [list(st.sk)]})
        waiting, st.deferred = st.deferred, []
        for d in waiting:
            d.waiting -= 1
            if d.waiting == 0:
                self._send_values(d.ident, d.rid, d.items, d.shm, d.cpull)

    def _apply(self, st: ShardState, values: list) -> None:
        if self.updater is None and len(values) == 2 and type(values[0]) is np.ndarray \
                and type(values[1]) is np.ndarray and st.flat.size < self.reducer.bigarray_bound:
            np.add(values[0], values[1], out=st.flat)
            return
        if self.updater is None and all(not isinstance(v, (tuple, RowSparseArray)) for v in values):
            self.reducer.sum_into(st.data.reshape(-1), values)  # assign the sum
        else:
            merged = self._merged(st)
            if self.updater is not None:
                self.updater(st.key, merged, st.data)
            elif isinstance(merged, RowSparseArray):
                st.data[...] = 0
                st.data[merged.indices] = merged.data
            else:
                self.reducer.copy_into(st.data, merged)

    def _compressed_value(self, ident: bytes, st: ShardState) -> tuple[str, Any]:
        """Compressed pulls: the first sends the value; later ones send the compressed difference
        between the value and what this worker holds (both sides add the decoded difference)."""
        flat = st.data.reshape(-1)
        mirror = st.mirrors.get(ident)
        if mirror is None:
            st.mirrors[ident] = flat.copy()
            return "raw", flat.copy()
        delta = flat - mirror
        payload = self.compressor.encode(delta, np.zeros_like(delta))
        self.compressor.decode(payload, mirror, accumulate=True)
        payload = np.ascontiguousarray(payload)
        return f"comp:{payload.dtype.name}", payload

    def _send_values(self, ident: bytes, rid: Any, states: list, shm: bool = False, cpull: bool = False) -> None:
        if shm and not cpull and states and states[0].bank is not None:
            bank = states[0].bank
            off = lo = states[0].bank_off
            for st in states:
                if st.bank is not bank or st.bank_off != off:
                    break
                off += align8(st.data.nbytes)
            else:  # consecutive shards of one bank: its name and where they are
                self._reply(ident, {"op": "data", "id": rid, "shmb": [bank.name, lo, off]})
                self.stats["pulls"] += 1
                return
        frames = []
        tracked = []
        names = []
        encs = []
        for st in states:
            if cpull:
                enc, value = self._compressed_value(ident, st)
                encs.append(enc)
                frames.append(value)
                continue
            if shm and st.seg is not None:
                names.append(st.seg.name)
                continue
            names.append(None)
            frames.append(st.flat)
            tracked.append(st)
        trackers: list = []
        header = {"op": "data", "id": rid}
        if shm:
            header["shm"] = names
        if cpull:
            header["enc"] = encs
        self._reply(ident, header, frames, track_into=None if cpull else trackers)
        if trackers:
            for st in tracked:
                if len(st.trackers) > 8:
                    st.trackers = [t for t in st.trackers if not t.done]
                st.trackers.extend(trackers)
        self.stats["pulls"] += 1

    def _pull(self, ident: bytes, rid: Any, h: dict, states: list | None = None) -> None:
        if states is None:
            items = h.get("items")
            if not isinstance(items, list):
                raise RequestError("pull without items")
            states = [self._shard(item)[1] for item in items]
        cpull = bool(h.get("cpull")) and self.compressor is not None
        shm = bool(h.get("shm")) and self.shm_dir is not None and bool(h.get("sync", True)) and not cpull
        waits = [st for st in states if st.pushers and ident in st.pushers]
        if not waits:
            self._send_values(ident, rid, states, shm, cpull)
            return
        d = Deferred(ident, rid, "pull", states, len(waits), shm, cpull)
        for st in waits:
            st.deferred.append(d)

    def _rsp_pull(self, ident: bytes, rid: Any, h: dict, frames: list) -> None:
        items = h.get("items")
        if not isinstance(items, list) or len(items) != len(frames):
            raise RequestError("row_sparse_pull: one row-id frame per item is needed")
        out = []
        for item, frame in zip(items, frames):
            sk, st = self._shard(item)
            rows = self._array(frame, np.dtype(np.int64), None, f"row_sparse_pull of key {st.key!r}")
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= st.data.shape[0]):
                raise RequestError(f"row_sparse_pull of key {st.key!r}: row ids outside [0, {st.data.shape[0]})")
            out.append(np.ascontiguousarray(st.data[rows]).reshape(-1))
        self._reply(ident, {"op": "data", "id": rid}, out)

    def _set_optimizer(self, ident: bytes, rid: Any, h: dict) -> None:
        from kvframe import plugins
        from kvframe.config import validate_plugin_config

        text = h.get("config")
        if not isinstance(text, str):
            raise RequestError("set_optimizer needs a JSON config")
        try:
            data = json.loads(text)
            config = validate_plugin_config("optimizers", data, "optimizer config from a worker")
            opt = plugins.create("optimizers", config)
            updater = opt.create_updater()
        except Exception as exc:
            raise RequestError(f"cannot build the optimizer: {type(exc).__name__}: {exc}") from None
        self.updater = updater
        self.optimizer_config = text
        log.info("server %d: optimizer %s", self.rank, data.get("type"))
        self._reply(ident, {"op": "ok", "id": rid})

    def _set_compression(self, ident: bytes, rid: Any, h: dict) -> None:
        from kvframe import plugins
        from kvframe.config import validate_plugin_config

        try:
            config = validate_plugin_config("compressors", json.loads(h.get("config", "")),
                                            "gradient compression config from a worker")
            self.compressor = plugins.create("compressors", config)
        except Exception as exc:
            raise RequestError(f"cannot build the compressor: {type(exc).__name__}: {exc}") from None
        self._reply(ident, {"op": "ok", "id": rid})

    def _get_states(self, ident: bytes, rid: Any, h: dict) -> None:
        if self.updater is None or not hasattr(self.updater, "get_states"):
            raise RequestError("there are no optimizer states to save: call set_optimizer first")
        blob = self.updater.get_states(bool(h.get("dump_optimizer", False)))
        self._reply(ident, {"op": "data", "id": rid}, [blob])

    def _set_states(self, ident: bytes, rid: Any, h: dict, frames: list) -> None:
        if self.updater is None or not hasattr(self.updater, "set_states"):
            raise RequestError("load_optimizer_states needs an optimizer: call set_optimizer first")
        if len(frames) != 1:
            raise RequestError("set_states needs one frame")
        try:
            self.updater.set_states(frames[0].bytes)
        except Exception as exc:
            raise RequestError(f"cannot load the optimizer states: {type(exc).__name__}: {exc}") from None
        self._reply(ident, {"op": "ok", "id": rid})

    def _command(self, ident: bytes, rid: Any, h: dict) -> None:
        head, body = h.get("head"), h.get("body")
        if not isinstance(head, int) or not isinstance(body, str):
            raise RequestError("a command needs an int head and a str body")
        self.commands = (self.commands + [[head, body]])[-100:]  # the last 100
        log.info("server %d: command %d %r", self.rank, head, body[:200])
        self._reply(ident, {"op": "ok", "id": rid})

    def _stats(self, ident: bytes, rid: Any) -> None:
        info = {**self.stats, "rank": self.rank, "pid": os.getpid(), "addr": self.addr, "keys": len(self.shards),
                "commands": self.commands,
                "optimizer": self.optimizer_config,
                "compression": None if self.compressor is None else self.compressor.config.model_dump_json(),
                "elements": int(sum(s.data.size for s in self.shards.values()))}
        self._reply(ident, {"op": "ok", "id": rid, "stats": info})

    def handle(self, ident: bytes, h: dict, frames: list) -> None:
        op, rid = h["op"], h.get("id")
        try:
            if "items" not in h and ("rk" in h or "pk" in h):  # whole keys: [key, 0, "raw"] or [key, 0]
                keys = h.get("rk", h.get("pk"))
                if not isinstance(keys, list) or not all(type(k) is int for k in keys):
                    raise RequestError(f"malformed key list {str(keys)[:80]!r}")
                h["items"] = [[k, 0, "raw"] for k in keys] if "rk" in h else [[k, 0] for k in keys]
            if op == "push":
                self._push(ident, rid, h, frames)
            elif op == "pull":
                self._pull(ident, rid, h)
            elif op == "pushpull":
                states = self._push(ident, rid, h, frames, ack=False)
                self._pull(ident, rid, h, states)
            elif op == "init":
                self._init(ident, rid, h, frames)
            elif op == "rsp_pull":
                self._rsp_pull(ident, rid, h, frames)
            elif op == "set_optimizer":
                self._set_optimizer(ident, rid, h)
            elif op == "set_compression":
                self._set_compression(ident, rid, h)
            elif op == "get_states":
                self._get_states(ident, rid, h)
            elif op == "set_states":
                self._set_states(ident, rid, h, frames)
            elif op == "command":
                self._command(ident, rid, h)
            elif op == "ping":  # answered after everything this worker sent before
                self._reply(ident, {"op": "ok", "id": rid})
            elif op == "stats":
                self._stats(ident, rid)
            else:
                raise RequestError(f"unknown op {op!r}")
        except RequestError as exc:
            self._error(ident, rid, str(exc))
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # malformed fields
            self._error(ident, rid, f"malformed {op!r} request: {type(exc).__name__}: {exc}")
        except Exception as exc:  # never let one request stop the server
            log.exception("server %d: request %r failed", self.rank, op)
            self._error(ident, rid, f"{op!r} failed on the server: {type(exc).__name__}: {exc}")

    # main loop -------------------------------------------------------------------------------
    def run(self) -> int:
        welcome = register(self.transport, self.sched, self.env, "server", self.addr)
        self.rank = int(welcome["rank"])
        self.num_workers = int(welcome["num_workers"])
        log.info("server %d serving at %s", self.rank, self.addr)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.sched, zmq.POLLIN)
        env = self.env
        next_beat = 0.0
        last_sched = time.monotonic()
        try:
            while self.exit_code is None:
                now = time.monotonic()
                if now >= next_beat:
                    self.transport.send(self.sched, {"op": "hb", "role": "server", "rank": self.rank})
                    next_beat = now + env.heartbeat_interval
                events = dict(poller.poll(min(0.1, env.heartbeat_interval) * 1000))
                if self.sched in events:
                    last_sched = time.monotonic()
                    self._from_scheduler()
                elif time.monotonic() - last_sched > env.heartbeat_timeout:
                    log.error("server %d: the scheduler at %s stopped: no heartbeat reply for %.1f s (limit "
                              "KVFRAME_HEARTBEAT_TIMEOUT=%g s)", self.rank, env.scheduler_addr,
                              time.monotonic() - last_sched, env.heartbeat_timeout)
                    self.exit_code = 1
                if self.sock in events:
                    batch = []
                    for _ in range(64):  # take what has come (a burst), then look at the scheduler again
                        try:
                            batch.append(self.transport.recv(self.sock, router=True))
                        except zmq.Again:
                            break
                        except BadMessage as exc:
                            self.stats["dropped"] += 1
                            log.warning("server %d dropped a message: %s", self.rank, exc)
                        if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                            break
                    for ident, h, frames in by_priority(batch):
                        self.handle(ident, h, frames)
                    for ident in list(self.consumed):  # not told with a reply
                        self._reply(ident, {"op": "consumed"})
        finally:
            try:
                if self.exit_code == 0:
                    self.transport.send(self.sched, {"op": "bye", "role": "server", "rank": self.rank})
            finally:
                for st in self.shards.values():
                    if st.seg is not None:
                        st.seg.close()
                self.typed_views.clear()
                for seg in self.push_segs.values():
                    seg.close()
                for seg in self.banks:
                    seg.close()
                self.sock.close(linger=1000)
                self.sched.close(linger=1000)
                self.transport.close()
        return self.exit_code

    def _from_scheduler(self) -> None:
        while self.sched.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                _, h, _ = self.transport.recv(self.sched)
            except BadMessage as exc:
                log.warning("server %d dropped a message from the scheduler: %s", self.rank, exc)
                continue
            if h["op"] == "stop":
                log.info("server %d: every worker finished; stopping", self.rank)
                self.exit_code = 0
            elif h["op"] == "dead":
                log.error("server %d: %s; stopping", self.rank, h.get("msg"))
                self.exit_code = 1


def main(argv: list[str] | None = None) -> int:
    def serve(env: NodeEnv) -> int:
        load_extra_plugins()
        return Server(env).run()

    return run_role("server", serve)


if __name__ == "__main__":
    sys.exit(main())
