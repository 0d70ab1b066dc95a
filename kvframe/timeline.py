"""The timeline: ``KVFRAME_TIMELINE=FILE`` records every operation as Chrome trace events.

Off by default. When off, an instrumented place costs one check of the module-level flag
:data:`enabled` (the front checks it once per call; :func:`span` is a function call returning a
shared no-op context). When on, every process that records anything (workers and servers; the
scheduler and the launcher record nothing) writes its own file:

* ``KVFRAME_TIMELINE=trace.json`` (or ``trace``): ``trace.worker0.json``, ``trace.server1.json``, ...
* ``KVFRAME_TIMELINE=DIR/`` (a trailing slash, or an existing directory): ``DIR/worker0.json``, ...

Each file is Chrome's "JSON Array Format", one event per line: ``X`` (complete) events with
``name``, ``cat``, ``ph``, ``ts`` and ``dur`` (microseconds since the process started recording),
``pid``, ``tid`` and ``args`` (``key``, ``bytes``, ...), and ``M`` (metadata) events naming the
process and its threads and recording the clock: ``kvframe_clock`` holds ``time.time()`` at the
instant the process's ``ts`` 0 was taken. Events are buffered and written every second (and every
4096 events), at :func:`close`, at exit and on SIGTERM; the closing ``]`` is written last, so the
file of a process that crashed is valid up to its last write but for that bracket, which Chrome's
format allows and :func:`read_events` tolerates. ``kvframe timeline FILE...`` (:func:`merge`)
puts the files onto one clock, one Perfetto process per kvframe process ("worker 0", "server 1").

What is recorded: the front (:class:`kvframe.KVStore`) one ``op`` span per operation per key
(``init``, ``push``, ``pull``, ``pushpull``, ``broadcast``, ``row_sparse_pull``) with the key and
its bytes; stores add ``phase`` spans inside them with :func:`span`::

    from kvframe import timeline
    with timeline.span("reduce", key=k, nbytes=n):     # off: one call, one flag check
        ...
    if timeline.enabled:                                # in a loop over elements: guard it
        t0 = timeline.now(); ...; timeline.complete("compress", t0, key=k, nbytes=n)
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

ENV = "KVFRAME_TIMELINE"

#: True while this process records a timeline: the one check every instrumented place makes.
enabled: bool = False

FLUSH_EVERY_S = 1.0
FLUSH_EVERY_EVENTS = 4096
OPS = ("init", "push", "pull", "pushpull", "broadcast", "row_sparse_pull")


def process_file(base: str, role: str, rank: int | str) -> str:
    """The file a process writes for ``KVFRAME_TIMELINE=base``: ``trace.json`` -> ``trace.worker0.json``,
    ``trace`` -> ``trace.worker0.json``, ``DIR/`` (or an existing directory) -> ``DIR/worker0.json``."""
    tag = f"{role}{rank}"
    if base.endswith(("/", os.sep)) or os.path.isdir(base):
        return os.path.join(base, f"{tag}.json")
    root, ext = os.path.splitext(base)
    return f"{root}.{tag}.json" if ext.lower() == ".json" else f"{base}.{tag}.json"


def _json_default(x: Any) -> Any:
    item = getattr(x, "item", None)  # numpy scalars
    if item is not None:
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(x)


def _dumps(ev: dict) -> str:
    return json.dumps(ev, separators=(",", ":"), default=_json_default)


class _Recorder:
    def __init__(self, base: str):
        self.base = base
        self.pid = os.getpid()
        self.wall_ns = time.time_ns()
        self.origin_ns = time.perf_counter_ns()  # ts 0 of this process: time.time() was wall_ns here
        self.role: str | None = None
        self.rank: int | str | None = None
        self.events: list[dict] = []
        self.threads: dict[int, str] = {}
        self.lock = threading.Lock()
        self.file: Any = None
        self.path: str | None = None
        self.named: tuple[str, int | str] | None = None  # what the file's process_name says
        self.next_flush_ns = self.origin_ns + int(FLUSH_EVERY_S * 1e9)
        self.closed = False

    def now_us(self) -> float:
        return (time.perf_counter_ns() - self.origin_ns) / 1000.0

    def add(self, ev: dict) -> None:
        tid = threading.get_native_id()
        ev["pid"] = self.pid
        ev["tid"] = tid
        with self.lock:
            if tid not in self.threads:
                self.threads[tid] = threading.current_thread().name
                self.events.append({"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "ts": 0,
                                    "args": {"name": self.threads[tid]}})
            self.events.append(ev)
            due = len(self.events) >= FLUSH_EVERY_EVENTS or time.perf_counter_ns() >= self.next_flush_ns
        if due:
            self.flush()

    def _header(self) -> list[dict]:
        role, rank = self.role or "process", self.rank if self.rank is not None else self.pid
        return [{"ph": "M", "name": "kvframe_clock", "pid": self.pid, "tid": 0, "ts": 0,
                 "args": {"wall_time_us": self.wall_ns / 1000.0, "role": role, "rank": rank,
                          "host": socket.gethostname(), "os_pid": self.pid}}]

    def _names(self) -> list[dict]:
        role, rank = self.role or "process", self.rank if self.rank is not None else self.pid
        self.named = (role, rank)
        return [{"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0, "ts": 0,
                 "args": {"name": f"{role} {rank}"}}]

    def flush(self) -> None:
        with self.lock:
            self.next_flush_ns = time.perf_counter_ns() + int(FLUSH_EVERY_S * 1e9)
            events, self.events = self.events, []
            if self.closed or (not events and self.file is None):
                return
            lines: list[dict] = []
            if self.file is None:
                role, rank = self.role or "process", self.rank if self.rank is not None else self.pid
                self.path = process_file(self.base, role, rank)
                parent = os.path.dirname(self.path)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (open until close())
                self.file.write("[\n" + _dumps(self._header()[0]) + "\n")
                lines += self._names()
            elif self.named != (self.role or "process", self.rank if self.rank is not None else self.pid):
                lines += self._names()  # named after the file was opened: the later name wins
            lines += events
            if lines:
                self.file.write("".join("," + _dumps(ev) + "\n" for ev in lines))
            self.file.flush()

    def close(self) -> None:
        self.flush()
        with self.lock:
            if self.file is not None and not self.closed:
                self.file.write("]\n")
                self.file.close()
            self.closed = True


_rec: _Recorder | None = None
_local = threading.local()
_prev_sigterm: Any = None


def start(path: str | None = None) -> bool:
    """Start recording into ``path`` (default: ``$KVFRAME_TIMELINE``); False when there is none.
    Recording already under way goes on (into its own file)."""
    global _rec, enabled
    path = path if path is not None else os.environ.get(ENV, "").strip()
    if not path:
        return False
    if _rec is not None and not _rec.closed:
        return True
    _rec = _Recorder(path)
    enabled = True
    _install_sigterm()
    return True


def name_process(role: str, rank: int | str, override: bool = True) -> None:
    """Name this process in the timeline (``worker 0``, ``server 1``) and so its file. A store's
    backend that knows its role calls it with ``override=True``; the front names a process
    ``worker RANK`` only when nothing named it before."""
    rec = _rec
    if rec is None or (not override and rec.role is not None):
        return
    rec.role, rec.rank = str(role), rank


def now() -> float:
    """Microseconds on this process's timeline clock (0.0 when not recording)."""
    rec = _rec
    return rec.now_us() if rec is not None else 0.0


def complete(name: str, start_us: float | None, key: Any = None, nbytes: int | None = None, cat: str = "phase",
             **args: Any) -> None:
    """Record a span from ``start_us`` (a :func:`now` reading) until now. No-op when off."""
    rec = _rec
    if not enabled or rec is None:
        return
    end = rec.now_us()
    start_us = end if start_us is None else start_us
    if key is not None:
        args["key"] = key
    if nbytes is not None:
        args["bytes"] = int(nbytes)
    rec.add({"name": name, "cat": cat, "ph": "X", "ts": round(start_us, 3), "dur": round(max(0.0, end - start_us), 3),
             "args": args})


class _NullSpan:
    __slots__ = ()

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set(self, **args: Any) -> None:
        return None


_NULL = _NullSpan()


class _Span:
    __slots__ = ("name", "cat", "args", "t0")

    def __init__(self, name: str, cat: str, args: dict):
        self.name, self.cat, self.args = name, cat, args
        self.t0 = 0.0

    def __enter__(self) -> _Span:
        self.t0 = now()
        return self

    def set(self, **args: Any) -> None:
        """Add args known only inside the span (``s.set(bytes=n)``)."""
        self.args.update(args)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.args["error"] = exc_type.__name__
        complete(self.name, self.t0, cat=self.cat, **self.args)


def span(name: str, key: Any = None, nbytes: int | None = None, cat: str = "phase", **args: Any) -> Any:
    """``with timeline.span("reduce", key=k, nbytes=n):`` records the block as one span (a phase
    of an operation by default). When off: one call, returning a shared no-op context."""
    if not enabled:
        return _NULL
    if key is not None:
        args["key"] = key
    if nbytes is not None:
        args["bytes"] = int(nbytes)
    return _Span(name, cat, args)


# the front: one span per op per key --------------------------------------------------------------

def tracing() -> bool:
    """Recording, and not already inside a traced front call on this thread (the front's check)."""
    return enabled and not getattr(_local, "busy", False)


def nbytes(x: Any) -> int:
    """The bytes of an array, a RowSparseArray (data and row ids) or a list of them (0 for anything else)."""
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    n = getattr(x, "nbytes", None)
    if n is not None:
        try:
            return int(n)
        except (TypeError, ValueError):
            return 0
    data, idx = getattr(x, "data", None), getattr(x, "indices", None)  # RowSparseArray
    return (nbytes(data) + nbytes(idx)) if data is not None and idx is not None else 0


def _per_key(key: Any, data: Any) -> list[tuple[Any, int]]:
    if isinstance(key, (list, tuple)):
        keys = list(key)
        datas = list(data) if isinstance(data, (list, tuple)) and len(data) == len(keys) else [None] * len(keys)
        return [(k, nbytes(d)) for k, d in zip(keys, datas)]
    return [(key, nbytes(data))]


def trace_op(op: str, key: Any, data: Any, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``call(*args, **kwargs)`` (the front method again: :func:`tracing` is False inside) and
    record one ``op`` span per key, with the bytes of that key's ``data`` (values or outputs)."""
    rec = _rec
    _local.busy = True
    t0 = now()
    error = None
    try:
        return call(*args, **kwargs)
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        _local.busy = False
        if rec is not None and enabled:
            end = rec.now_us()
            try:
                pairs = _per_key(key, data)
            except Exception:  # a value the front refused: still one span
                pairs = [(repr(key)[:100], 0)]
            many = len(pairs)
            for k, n in pairs:
                a: dict[str, Any] = {"key": k if isinstance(k, (int, str)) else str(k), "bytes": n}
                if many > 1:
                    a["keys"] = many
                if error is not None:
                    a["error"] = error
                if kwargs.get("wait") is False:
                    a["wait"] = False
                rec.add({"name": op, "cat": "op", "ph": "X", "ts": round(t0, 3), "dur": round(max(0.0, end - t0), 3),
                         "args": a})


# flushing ------------------------------------------------------------------------------------------

def flush() -> None:
    """Write what is buffered (the file stays open and valid but for its closing bracket)."""
    if _rec is not None:
        _rec.flush()


def close() -> str | None:
    """Write everything, close the file and stop recording; returns the file's path (None when
    nothing was recorded)."""
    global enabled, _prev_sigterm
    rec = _rec
    enabled = False
    if _prev_sigterm is not None and threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, _prev_sigterm)
        except (ValueError, OSError):
            pass
        _prev_sigterm = None
    if rec is None:
        return None
    rec.close()
    return rec.path


def path() -> str | None:
    """This process's timeline file (known once something was written)."""
    return _rec.path if _rec is not None else None


def _install_sigterm() -> None:
    """On SIGTERM (the launcher stopping a job): write the timeline, then die of SIGTERM as before.
    Only where nobody else handles SIGTERM, and only from the main thread."""
    global _prev_sigterm
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            return
        _prev_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    try:
        close()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # dies of SIGTERM, as it would have without the timeline


def _after_fork_in_child() -> None:
    """A forked child records into a file of its own (named by its pid until something names it),
    never into its parent's (whose buffer is flushed after every write, so nothing is written twice)."""
    global _rec
    rec = _rec
    if rec is not None and not rec.closed:
        _rec = _Recorder(rec.base)
        _rec.role, _rec.rank = "process", _rec.pid  # a store backend that knows its role renames it


atexit.register(close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# reading and merging -------------------------------------------------------------------------------

_TAG = re.compile(r"(?:^|[./])(worker|server|scheduler|process)(\d+)\.json$")


def read_events(path: str) -> tuple[list[dict], list[str]]:
    """The events of one timeline file and notes on what was skipped. Tolerates a file cut short
    (no closing bracket, a last line half written) and takes the JSON Object Format too."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    notes: list[str] = []
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return list(data.get("traceEvents") or []), notes
    if isinstance(data, list):
        return data, notes
    events: list[dict] = []
    stripped = text.strip()
    if stripped.startswith("{"):  # an object cut short: read its events line by line
        notes.append(f"{path}: not valid JSON; reading its events line by line")
    else:
        notes.append(f"{path}: no closing bracket (the process did not close its timeline); read up to its last "
                     "whole event")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip().strip(",").strip()
        if not line.startswith("{") or not line.endswith("}"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            notes.append(f"{path}:{n}: skipped a broken line")
            continue
        if isinstance(ev, dict) and "ph" in ev:
            events.append(ev)
    return events, notes


def expand(paths: Iterable[str]) -> list[str]:
    """Files to merge: each path itself, or, for a KVFRAME_TIMELINE value (``trace.json``, ``trace``,
    a directory), the per-process files it names."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "*.json")) if _TAG.search(os.path.basename(f)))
        else:
            found = []
            if not _TAG.search(p):  # a KVFRAME_TIMELINE value (also when a merge already wrote that file)
                root, ext = os.path.splitext(p)
                stem = root if ext.lower() == ".json" else p
                found = sorted(f for f in glob.glob(glob.escape(stem) + ".*.json") if _TAG.search(f))
            if not found and os.path.isfile(p):
                found = [p]
        if not found:
            raise FileNotFoundError(f"no timeline file {p!r} (nor per-process files {p!r} names)")
        out += [f for f in found if f not in out]
    return out


def default_output(paths: list[str]) -> str | None:
    """Where ``kvframe timeline`` writes without ``-o``: ``trace.json`` for ``trace.worker0.json``,
    ..., ``DIR/timeline.json`` for ``DIR/worker0.json``, ...; None when the inputs differ."""
    bases = set()
    for p in paths:
        m = _TAG.search(p)
        if m is None:
            return None
        head = p[:m.start()]
        bases.add(os.path.join(head, "timeline.json") if p[m.start()] == "/" or m.start() == 0 else head + ".json")
    return bases.pop() if len(bases) == 1 else None


_ROLE_ORDER = {"worker": 0, "server": 1, "scheduler": 2}


def merge(paths: list[str]) -> tuple[dict, list[dict], list[str]]:
    """Merge per-process files onto one clock: returns the trace (JSON Object Format, one process per
    file named ``role rank``), a summary per process and notes. The files' ``kvframe_clock``
    events align them (``time.time()`` of each process's ``ts`` 0; across hosts as good as their
    clocks' agreement); ``ts`` 0 of the merged trace is the earliest process's start."""
    notes: list[str] = []
    loaded = []
    for p in paths:
        events, more = read_events(p)
        notes += more
        clock = next((e for e in events if e.get("ph") == "M" and e.get("name") == "kvframe_clock"), None)
        names = [e for e in events if e.get("ph") == "M" and e.get("name") == "process_name"]
        label = str(names[-1]["args"].get("name")) if names else None
        wall = None
        role, rank = "process", 0
        if clock is not None:
            a = clock.get("args") or {}
            wall = a.get("wall_time_us")
            role, rank = str(a.get("role", role)), a.get("rank", rank)
        else:
            notes.append(f"{p}: no kvframe_clock event; its times are left as they are")
        m = _TAG.search(p)
        if label is None:
            label = f"{m[1]} {m[2]}" if m else os.path.basename(p)
        loaded.append((p, events, wall, role, rank, label))
    walls = [w for _, _, w, _, _, _ in loaded if isinstance(w, (int, float))]
    base = min(walls) if walls else 0.0

    def order(item: tuple) -> tuple:
        _, _, _, role, rank, label = item
        return (_ROLE_ORDER.get(role, 3), rank if isinstance(rank, int) else 1 << 30, label)

    trace: list[dict] = []
    summary: list[dict] = []
    seen_labels: dict[str, int] = {}
    for index, (p, events, wall, _role, _rank, label) in enumerate(sorted(loaded, key=order)):
        pid = index + 1
        seen_labels[label] = seen_labels.get(label, 0) + 1
        if seen_labels[label] > 1:
            label = f"{label} ({os.path.basename(p)})"
        shift = (wall - base) if isinstance(wall, (int, float)) else 0.0
        trace.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": 0, "args": {"name": label}})
        trace.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "ts": 0,
                      "args": {"sort_index": index}})
        spans = []
        for e in events:
            if e.get("ph") == "M":
                if e.get("name") in ("process_name", "process_sort_index"):
                    continue
                trace.append({**e, "pid": pid, "ts": 0})
                continue
            if "ts" not in e:
                continue
            spans.append({**e, "pid": pid, "ts": float(e["ts"]) + shift})
        spans.sort(key=lambda e: (e["ts"], -float(e.get("dur", 0) or 0)))
        trace += spans
        if spans:
            first = spans[0]["ts"]
            last = max(e["ts"] + float(e.get("dur", 0) or 0) for e in spans)
        else:
            first = last = 0.0
        summary.append({"process": label, "file": p, "events": len(spans), "start_us": first,
                        "span_us": last - first, "ops": sum(1 for e in spans if e.get("cat") == "op")})
    doc = {"traceEvents": trace, "displayTimeUnit": "ms",
           "otherData": {"kvframe": {"files": list(paths), "wall_time_us_at_ts0": base}}}
    return doc, summary, notes


if os.environ.get(ENV, "").strip():  # every process of a job given KVFRAME_TIMELINE records
    start()


__all__ = ["ENV", "OPS", "enabled", "start", "close", "flush", "path", "name_process", "now", "span", "complete",
           "tracing", "trace_op", "nbytes", "read_events", "expand", "merge", "default_output", "process_file"]
