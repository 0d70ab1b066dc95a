"""A server: holds key shards, sums the workers' pushes and applies the optimizer.

The round logic (when a shard's pushes are complete, which replies wait) is the round table of
:mod:`kvframe_dist.rounds`; this module reads requests, checks every item before changing
anything, and answers. The optimizer arrives as a validated JSON config and is built from this
process's installed plugins; nothing received is unpickled. A wrong request gets an error reply
naming the key and the reason; the server keeps serving.

Run on its own with ``python -m kvframe_dist.server`` (environment as for MXNet).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Hashable
from typing import Any

import numpy as np

from kvframe import plugins, timeline
from kvframe.arrays import RowSparseArray
from kvframe.errors import KVFrameError
from kvframe.plugins import validate_plugin_config
from kvframe.reduce import Reducer
from kvframe_dist.address import advertise_host
from kvframe_dist.endpoint import Endpoint, role_transport
from kvframe_dist.env import NodeEnv, run_role
from kvframe_dist.membership import Heartbeat, register
from kvframe_dist.rounds import RoundTable, Slot
from kvframe_dist.sharding import wire_dtype
from kvframe_dist.wire import Message

log = logging.getLogger("kvframe_dist.server")

BURST = 64  # requests taken at once, then ordered by priority


class RequestError(Exception):
    """A request the server refuses; the message goes back to the worker."""


def by_priority(batch: list) -> list:
    """The order to serve a burst of ``(peer, message)`` in: each worker's requests keep the order it
    sent them; among the workers' next requests the highest ``prio`` goes first (then arrival)."""
    if len(batch) < 2 or all(not m.get("prio") for _, m in batch):
        return batch
    queues: dict[Hashable, list] = {}
    for seq, (peer, msg) in enumerate(batch):
        queues.setdefault(peer, []).append((seq, (peer, msg)))
    heads = {peer: 0 for peer in queues}
    out = []
    while heads:
        peer = max(heads, key=lambda p: (queues[p][heads[p]][1][1].get("prio", 0), -queues[p][heads[p]][0]))
        out.append(queues[peer][heads[peer]][1])
        heads[peer] += 1
        if heads[peer] == len(queues[peer]):
            del heads[peer]
    return out


def load_extra_plugins() -> None:
    """``KVFRAME_PLUGIN_MODULES=a.b,c``: register these modules' plugins in this process too."""
    for mod in filter(None, (m.strip() for m in os.environ.get("KVFRAME_PLUGIN_MODULES", "").split(","))):
        plugins.register_plugin(importlib.import_module(mod))


def _array(frame: Any, dtype: np.dtype, count: int | None, what: str) -> np.ndarray:
    nbytes = memoryview(frame).nbytes
    if nbytes % dtype.itemsize:
        raise RequestError(f"{what}: {nbytes} bytes is not a whole number of {dtype.name} values")
    arr = np.frombuffer(frame, dtype=dtype)
    if count is not None and arr.size != count:
        raise RequestError(f"{what}: got {arr.size} {dtype.name} values ({nbytes} bytes), expected {count}")
    return arr


class Server:
    def __init__(self, env: NodeEnv):
        self.env = env
        self.ep = Endpoint(role_transport(env), env.secret, "server", env.mac_data)
        host = env.node_host or advertise_host(env.root_uri, env.root_port, env.interface)
        self.addr = self.ep.listen(host, env.port)
        self.sched = self.ep.connect_to(env.root_uri, env.root_port)
        self.rank = -1
        self.slots: dict[tuple[int, int], Slot] = {}
        self.rounds = RoundTable(env.num_workers, self._apply)
        self.updater: Any = None
        self.optimizer_config: str | None = None
        self.compressor: Any = None
        self.reducer = Reducer(bigarray_bound=env.bigarray_bound)
        self.commands: list = []
        self.stats = {"pushes": 0, "pulls": 0, "errors": 0}
        self.exit_code: int | None = None

    # replies ---------------------------------------------------------------------------------
    def _reply(self, peer: Hashable, msg: Message) -> None:
        if not self.ep.try_send(peer, msg):
            log.warning("server %d: reply %s to %s failed (the worker is gone?)", self.rank, msg.op,
                        self.ep.name(peer))

    def _error(self, peer: Hashable, rid: int | None, text: str) -> None:
        self.stats["errors"] += 1
        log.warning("server %d refused a request from %s: %s", self.rank, self.ep.name(peer), text)
        fields: dict = {"msg": f"server {self.rank} at {self.addr}: {text}"}
        if rid is not None:
            fields["id"] = rid
        self._reply(peer, Message("error", fields))

    def _ok(self, peer: Hashable, msg: Message, **extra: Any) -> None:
        self._reply(peer, Message("ok", {"id": msg["id"], **extra}))

    # items -----------------------------------------------------------------------------------
    def _slot(self, key: int, part: int) -> Slot:
        slot = self.slots.get((key, part))
        if slot is None:
            raise RequestError(f"unknown key {key} (part {part}): it was not initialised on this server")
        return slot

    def _decode_push(self, slot: Slot, enc: str, frames: list, pos: int, what: str) -> tuple[Any, int]:
        """The pushed value of one item and how many frames it used."""
        data = slot.data
        if pos >= len(frames):
            raise RequestError(f"{what}: its data frame is missing")
        if enc == "raw":
            return _array(frames[pos], data.dtype, data.size, what), 1
        if enc.startswith("c:"):
            if self.compressor is None:
                raise RequestError(f"{what}: a compressed push came but no gradient compression is set on the servers")
            return ("comp", _array(frames[pos], wire_dtype(enc[2:]), None, what)), 1
        if enc == "rsp":
            if pos + 1 >= len(frames):
                raise RequestError(f"{what}: a row-sparse push needs two frames (rows, data)")
            rows = _array(frames[pos], np.dtype(np.int64), None, what + " (row ids)")
            row_size = data.size // data.shape[0] if data.shape[0] else 0
            values = _array(frames[pos + 1], data.dtype, rows.size * row_size, what + " (rows)")
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= data.shape[0]):
                raise RequestError(f"{what}: row ids outside [0, {data.shape[0]})")
            return RowSparseArray.from_rows(values.reshape((rows.size,) + data.shape[1:]), rows, data.shape), 2
        raise RequestError(f"{what}: unknown encoding {enc!r}")

    # operations ------------------------------------------------------------------------------
    def _init(self, peer: Hashable, msg: Message) -> None:
        keys, parts, dtypes, shapes, names = (msg[f] for f in ("keys", "parts", "dtypes", "shapes", "names"))
        n = len(keys)
        if not (len(parts) == len(dtypes) == len(shapes) == len(names) == len(msg.frames) == n):
            raise RequestError(f"init: {len(msg.frames)} data frames, {n} keys, {len(parts)} parts, "
                               f"{len(dtypes)} dtypes, {len(shapes)} shapes")
        new: dict[tuple[int, int], Slot] = {}
        for k, p, dt, shape, name, frame in zip(keys, parts, dtypes, shapes, names, msg.frames):
            what = f"init of key {name if name is not None else k} (part {p})"
            count = int(np.prod(shape)) if shape else 1
            arr = _array(frame, wire_dtype(dt), count, what)
            if (k, p) in self.slots or (k, p) in new:
                raise RequestError(f"duplicate {what}")
            new[(k, p)] = Slot(name if name is not None else k, arr.reshape(shape).copy())
        self.slots.update(new)
        log.debug("server %d: init of %d key shards from %s", self.rank, n, self.ep.name(peer))
        self._ok(peer, msg)

    def _push(self, peer: Hashable, msg: Message) -> list[Slot]:
        """Check every item, then hand each to its round; returns the pushed slots (for pushpull)."""
        sync = msg["sync"]
        if not sync and self.updater is None:
            raise RequestError("dist_async needs an optimizer on the servers (updates run per push): call "
                               "set_optimizer before pushing")
        decoded = []
        pos = 0
        frames = msg.frames
        items = msg.items()
        if len({(k, p) for k, p, _ in items}) != len(items):
            raise RequestError(f"{msg.op}: a key shard is named more than once")
        t0 = timeline.now() if timeline.enabled else 0.0
        for key, part, enc in items:
            slot = self._slot(key, part)
            value, used = self._decode_push(slot, enc, frames, pos, f"push of key {slot.key!r} part {part}")
            pos += used
            decoded.append((slot, value))
        if pos != len(frames):
            raise RequestError(f"push: {len(frames)} data frames for {len(decoded)} items")
        self.stats["pushes"] += 1
        if timeline.enabled or log.isEnabledFor(logging.DEBUG):
            self._note_push(peer, msg, decoded, t0)
        for slot, value in decoded:
            self.rounds.push(slot, peer, value, sync)
        return [slot for slot, _ in decoded]

    def _merged(self, slot: Slot) -> Any:
        """The sum of a round's values: a RowSparseArray when every push was row-sparse, else dense."""
        values = slot.pending
        if all(isinstance(v, RowSparseArray) for v in values):
            if len(values) == 1:
                return values[0]
            return RowSparseArray.from_rows(np.concatenate([v.data for v in values]),
                                            np.concatenate([v.indices for v in values]), slot.data.shape)
        merge = slot.scratch.get("merge")
        if merge is None:
            merge = slot.scratch["merge"] = np.empty_like(slot.data)
        flat = merge.reshape(-1)
        raw = [v.todense().reshape(-1) if isinstance(v, RowSparseArray) else v
               for v in values if not isinstance(v, tuple)]
        if raw:
            self.reducer.sum_into(flat, raw)
        else:
            flat[...] = 0
        for v in values:
            if isinstance(v, tuple):  # compressed
                self.compressor.decode(v[1], merge, accumulate=True)
        return merge

    def _note_push(self, peer: Hashable, msg: Message, decoded: list, t0: float) -> None:
        """KVFRAME_TIMELINE / DEBUG: a push received (decoded and checked); the rounds it opens start now."""
        nbytes = sum(memoryview(f).nbytes for f in msg.frames)
        if timeline.enabled:
            timeline.complete("receive", t0, nbytes=nbytes, op=msg.op, items=len(decoded), worker=self.ep.name(peer),
                              keys=[s.key for s, _ in decoded][:16])
            now = timeline.now()
            for slot, _ in decoded:
                if not slot.pending:
                    slot.scratch["round_t0"] = now
        if log.isEnabledFor(logging.DEBUG):
            log.debug("server %d: %s of %d key shards (%d bytes) from %s", self.rank, msg.op, len(decoded), nbytes,
                      self.ep.name(peer))

    def _apply(self, slot: Slot) -> None:
        """A round is complete: update (or store the sum); KVFRAME_TIMELINE: one ``round`` span
        (first push received to updated) around its reduce and update phases."""
        if not timeline.enabled and not log.isEnabledFor(logging.DEBUG):
            self._update(slot)
            return
        t0 = slot.scratch.pop("round_t0", None)
        pushes = len(slot.pending)
        try:
            self._update(slot)
        finally:
            timeline.complete("round", t0, key=slot.key, nbytes=slot.data.nbytes, cat="round", pushes=pushes)
            log.debug("server %d: round of key %r complete: %d pushes, %d bytes", self.rank, slot.key, pushes,
                      slot.data.nbytes)

    def _update(self, slot: Slot) -> None:
        """Run the optimizer on the sum of the round's pushes, or store the sum."""
        values = slot.pending
        # kvframe-torch (allreduce, worker-side optimizers): sum-only keys ('__sum__/...', the rule of
        # kvframe.sumkeys) are summed and stored, never given to the optimizer
        from kvframe.sumkeys import is_sum_key
        updater = None if is_sum_key(slot.key) else self.updater
        if updater is None and len(values) == 2 and type(values[0]) is np.ndarray \
                and type(values[1]) is np.ndarray and values[0].size < self.reducer.bigarray_bound:
            with timeline.span("reduce", key=slot.key, nbytes=slot.data.nbytes):
                np.add(values[0], values[1], out=slot.data.reshape(-1))  # the common small case, without the pool
            return
        if updater is None and all(not isinstance(v, (tuple, RowSparseArray)) for v in values):
            with timeline.span("reduce", key=slot.key, nbytes=slot.data.nbytes):
                self.reducer.sum_into(slot.data.reshape(-1), values)
            return
        with timeline.span("reduce", key=slot.key, nbytes=slot.data.nbytes):
            merged = self._merged(slot)
        if updater is not None:
            with timeline.span("update", key=slot.key, nbytes=slot.data.nbytes):
                updater(slot.key, merged, slot.data)
        elif isinstance(merged, RowSparseArray):
            slot.data[...] = 0
            slot.data[merged.indices] = merged.data
        else:
            self.reducer.copy_into(slot.data, merged)

    def _compressed_value(self, peer: Hashable, slot: Slot) -> tuple[str, np.ndarray]:
        """Compressed pulls: the compressed difference between the value and the copy this worker
        holds (both sides add it to that copy). When one compressed step cannot bring the copy
        within one step of the value (the threshold; with a scale-free threshold, the magnitude this
        step sends), the value goes raw: a copy never drifts."""
        flat = slot.data.reshape(-1)
        mirrors = slot.scratch.setdefault("mirrors", {})
        mirror = mirrors.get(peer)
        if mirror is not None:
            delta = flat - mirror
            residual = np.zeros_like(flat)  # after encode: what this step leaves out
            payload = self.compressor.encode(delta, residual)
            config = self.compressor.config
            if getattr(config, "threshold_scale", "absolute") == "absolute":
                step = float(config.threshold)
            else:  # what the step moves an element by: the part of delta it carried
                step = float(np.max(np.abs(delta - residual), initial=0.0))
            if float(np.max(np.abs(residual), initial=0.0)) <= step:
                self.compressor.decode(payload, mirror, accumulate=True)
                payload = np.ascontiguousarray(payload)
                return f"c:{payload.dtype.name}", payload
        mirrors[peer] = flat.copy()
        return "raw", mirrors[peer]

    def _send_values(self, peer: Hashable, rid: int, slots: list[Slot], cpull: bool) -> None:
        if timeline.enabled:  # KVFRAME_TIMELINE: the reply phase
            with timeline.span("reply", nbytes=sum(s.data.nbytes for s in slots), items=len(slots),
                               worker=self.ep.name(peer), keys=[s.key for s in slots][:16]):
                self._send_values_now(peer, rid, slots, cpull)
        else:
            self._send_values_now(peer, rid, slots, cpull)

    def _send_values_now(self, peer: Hashable, rid: int, slots: list[Slot], cpull: bool) -> None:
        if cpull:
            encs, frames = zip(*(self._compressed_value(peer, s) for s in slots)) if slots else ((), ())
            self._reply(peer, Message("data", {"id": rid, "encs": list(encs)}, frames))
        else:
            self._reply(peer, Message("data", {"id": rid}, [s.data.reshape(-1) for s in slots]))
        self.stats["pulls"] += 1

    def _shards(self, msg: Message) -> list[Slot]:
        """The slots a request names, each once: a reply is never larger than the values asked for
        (a 150 KB pull naming one key 50,000 times got a 205 MB reply in the first build)."""
        items = msg.items()
        if len({(k, p) for k, p, _ in items}) != len(items):
            raise RequestError(f"{msg.op}: a key shard is named more than once")
        return [self._slot(k, p) for k, p, _ in items]

    def _pull(self, peer: Hashable, msg: Message, slots: list[Slot] | None = None) -> None:
        if slots is None:
            slots = self._shards(msg)
        cpull = bool(msg.get("cpull")) and self.compressor is not None
        rid = msg["id"]
        self.rounds.after_round(peer, slots, lambda: self._send_values(peer, rid, slots, cpull))

    def _rsp_pull(self, peer: Hashable, msg: Message) -> None:
        items = msg.items()
        if len(items) != len(msg.frames):
            raise RequestError("row_sparse_pull: one row-id frame per item is needed")
        picks = []
        for (k, p, _), frame in zip(items, msg.frames):
            slot = self._slot(k, p)
            rows = _array(frame, np.dtype(np.int64), None, f"row_sparse_pull of key {slot.key!r}")
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= slot.data.shape[0]):
                raise RequestError(f"row_sparse_pull of key {slot.key!r}: row ids outside [0, {slot.data.shape[0]})")
            if rows.size > 1 and not bool(np.all(rows[1:] > rows[:-1])):  # each row once: a bounded reply
                raise RequestError(f"row_sparse_pull of key {slot.key!r}: row ids must be increasing, each once")
            picks.append((slot, rows))

        def respond() -> None:  # after this worker's open rounds, like a dense pull
            with timeline.span("reply", op="rsp_pull", items=len(picks), worker=self.ep.name(peer)):
                self._reply(peer, Message("data", {"id": msg["id"]},
                                          [np.ascontiguousarray(s.data[r]).reshape(-1) for s, r in picks]))
        self.rounds.after_round(peer, [s for s, _ in picks], respond)

    def _build(self, kind: str, text: str, what: str) -> Any:
        try:
            config = validate_plugin_config(kind, json.loads(text), f"{what} from a worker")
            return plugins.create(kind, config)
        except Exception as exc:
            raise RequestError(f"cannot build the {what}: {type(exc).__name__}: {exc}") from None

    def _set_optimizer(self, peer: Hashable, msg: Message) -> None:
        opt = self._build("optimizers", msg["config"], "optimizer")
        self.updater = opt.create_updater()
        self.optimizer_config = msg["config"]
        log.info("server %d: optimizer %s", self.rank, opt.config.type)
        self._ok(peer, msg)

    def _set_compression(self, peer: Hashable, msg: Message) -> None:
        self.compressor = self._build("compressors", msg["config"], "gradient compression")
        for slot in self.slots.values():  # pulled copies are of the old compression
            slot.scratch.pop("mirrors", None)
        self._ok(peer, msg)

    def _get_states(self, peer: Hashable, msg: Message) -> None:
        if self.updater is None or not hasattr(self.updater, "get_states"):
            raise RequestError("there are no optimizer states to save: call set_optimizer first")
        self._reply(peer, Message("data", {"id": msg["id"]}, [self.updater.get_states(bool(msg.get("dump")))]))

    def _set_states(self, peer: Hashable, msg: Message) -> None:
        if self.updater is None or not hasattr(self.updater, "set_states"):
            raise RequestError("load_optimizer_states needs an optimizer: call set_optimizer first")
        if len(msg.frames) != 1:
            raise RequestError("set_states needs one frame")
        try:
            self.updater.set_states(bytes(msg.frames[0]))
        except Exception as exc:
            raise RequestError(f"cannot load the optimizer states: {type(exc).__name__}: {exc}") from None
        self._ok(peer, msg)

    def _command(self, peer: Hashable, msg: Message) -> None:
        self.commands = (self.commands + [[msg["head"], msg["body"]]])[-100:]  # the last 100
        log.info("server %d: command %d %r", self.rank, msg["head"], msg["body"][:200])
        self._ok(peer, msg)

    def _stats(self, peer: Hashable, msg: Message) -> None:
        info = {**self.stats, "dropped": self.ep.dropped, "rank": self.rank, "pid": os.getpid(), "addr": self.addr,
                "keys": len(self.slots), "commands": self.commands, "optimizer": self.optimizer_config,
                "compression": None if self.compressor is None else self.compressor.config.model_dump_json(),
                "transport": self.env.transport,
                "elements": int(sum(s.data.size for s in self.slots.values()))}
        self._ok(peer, msg, stats=info)

    HANDLERS = {
        "init": _init, "pull": _pull, "rsp_pull": _rsp_pull, "set_optimizer": _set_optimizer,
        "set_compression": _set_compression, "get_states": _get_states, "set_states": _set_states,
        "command": _command, "stats": _stats,
    }

    def handle(self, peer: Hashable, msg: Message) -> None:
        op = msg.op
        try:
            if op == "push":
                self._push(peer, msg)
            elif op == "pushpull":
                self._pull(peer, msg, self._push(peer, msg))
            elif op == "ping":  # answered after everything this worker sent before
                self._ok(peer, msg)
            elif op in self.HANDLERS:
                self.HANDLERS[op](self, peer, msg)
            else:
                raise RequestError(f"a server does not take {op!r} messages")
        except RequestError as exc:
            self._error(peer, msg.get("id"), str(exc))
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # fields that do not fit together
            self._error(peer, msg.get("id"), f"malformed {op!r} request: {type(exc).__name__}: {exc}")
        except Exception as exc:  # one request never stops the server
            log.exception("server %d: request %r failed", self.rank, op)
            self._error(peer, msg.get("id"), f"{op!r} failed on the server: {type(exc).__name__}: {exc}")

    # main loop -------------------------------------------------------------------------------
    def run(self) -> int:
        early: list = []
        welcome = register(self.ep, self.sched, self.env, "server", self.addr, early)
        self.rank = welcome["rank"]
        self.rounds.num_workers = welcome["num_workers"]
        timeline.name_process("server", self.rank)
        log.info("server %d serving at %s (transport %s)", self.rank, self.addr, self.env.transport)
        log.debug("server %d: registered; %d workers", self.rank, self.rounds.num_workers)
        env = self.env
        # heartbeats on a thread and a connection of their own: a reply blocked on a dead worker's
        # link (up to the send timeout) must not silence this server at the scheduler
        hb = Heartbeat(env, "server", self.rank, on_failure=self._heartbeat_failed)
        hb.start()
        try:
            while self.exit_code is None:
                batch = early or []
                early = []
                got = self.ep.recv(min(0.1, env.heartbeat_interval)) if not batch else None
                while got is not None and len(batch) < BURST:
                    batch.append(got)
                    got = self.ep.recv(0)
                if got is not None:
                    batch.append(got)
                work = []
                for peer, msg in batch:
                    if peer == self.sched:
                        self._from_scheduler(msg)
                    else:
                        work.append((peer, msg))
                if timeline.enabled and work:  # KVFRAME_TIMELINE: each request's wait behind the burst read with it
                    read_at = timeline.now()
                    for peer, msg in by_priority(work):
                        timeline.complete("queue", read_at, op=msg.op, worker=self.ep.name(peer), burst=len(work))
                        self.handle(peer, msg)
                else:
                    for peer, msg in by_priority(work):
                        self.handle(peer, msg)
                if hb.failure is not None and self.exit_code is None:  # logged by the heartbeat thread
                    self.exit_code = 1
        finally:
            hb.stop()
            log.debug("server %d: shutting down (exit status %s)", self.rank, self.exit_code)
            try:
                if self.exit_code == 0:
                    self.ep.try_send(self.sched, Message("bye", {"id": 0, "role": "server", "rank": self.rank}))
                    time.sleep(0.05)  # let it leave before the connection closes
            finally:
                self.ep.close()
                self.reducer.close()
                timeline.flush()
        return self.exit_code

    def _heartbeat_failed(self) -> None:
        """The heartbeat thread learnt of a failure (a node declared stopped, a silent scheduler):
        stop, and close the endpoint so that a send blocked on a dead link ends now."""
        if self.exit_code is None:
            self.exit_code = 1
        self.ep.close()

    def _from_scheduler(self, msg: Message) -> None:
        if msg.op == "stop":
            log.info("server %d: every worker finished; stopping", self.rank)
            self.exit_code = 0
        elif msg.op == "dead":
            log.error("server %d: %s; stopping", self.rank, msg["msg"])
            self.exit_code = 1


def main(argv: list[str] | None = None) -> int:
    def serve(env: NodeEnv) -> int:
        load_extra_plugins()
        try:
            return Server(env).run()
        except (KVFrameError, ValueError, OSError) as exc:  # refused, unreachable, or a bad address
            log.error("server: cannot start: %s", exc)
            return 1

    return run_role("server", serve)


if __name__ == "__main__":
    sys.exit(main())
