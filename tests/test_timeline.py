"""KVFRAME_TIMELINE: Chrome trace-event files per process, and ``kvframe timeline`` merging them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import kvframe
from kvframe import cli, timeline

HERE = Path(__file__).resolve().parent


def _run(tmp_path: Path, code: str, env: dict[str, str | None]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("KVFRAME_TIMELINE", "KVFRAME_LOG_LEVEL")}
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=full, capture_output=True,
                          text=True, timeout=60)


def _check_shape(doc: dict) -> None:
    """What Perfetto needs of the JSON Object Format."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    for e in doc["traceEvents"]:
        for field in ("ph", "ts", "pid", "tid", "name"):
            assert field in e, e
        assert isinstance(e["ts"], (int, float)) and isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0, e
        else:
            assert e["ph"] == "M", e


def _monotonic_per_process(doc: dict) -> None:
    last: dict[int, float] = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            assert e["ts"] >= last.get(e["pid"], float("-inf")), e
            last[e["pid"]] = e["ts"]


LOCAL_JOB = """
    import numpy as np, kvframe
    kv = kvframe.create("local")
    kv.init(["w", "b"], [np.zeros((4, 5), np.float32), np.zeros(3, np.float64)])
    for _ in range(3):
        kv.push("w", [np.ones((4, 5), np.float32)] * 2)
        kv.push("b", np.ones(3))
    out = np.empty((4, 5), np.float32)
    kv.pull("w", out=out)
    kv.pushpull(["w", "b"], [np.ones((4, 5), np.float32), np.ones(3)], out=[out, np.empty(3)])
    kv.broadcast("c", np.arange(6.0), out=np.empty(6))
    kv.init("r", np.zeros((5, 2), np.float32))
    rsp = kvframe.RowSparseArray.zeros((5, 2), np.float32)
    kv.row_sparse_pull("r", out=rsp, row_ids=np.array([1, 3]))
    try:
        kv.push("w", np.ones(2, np.float32))
    except kvframe.errors.ShapeMismatchError:
        pass
    print("DONE")
"""


def test_nothing_is_written_when_unset(tmp_path):
    code = textwrap.dedent(LOCAL_JOB) + "from kvframe import timeline\nprint('enabled', timeline.enabled)\n"
    res = _run(tmp_path, code, {"KVFRAME_TIMELINE": None})
    assert res.returncode == 0, res.stderr
    assert "enabled False" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_off_in_this_process_is_a_no_op():
    assert timeline.enabled is False
    with timeline.span("reduce", key=1, nbytes=4) as s:
        s.set(extra=1)
    timeline.complete("x", timeline.now())
    assert timeline.path() is None or not timeline.enabled


def test_local_store_one_span_per_op_per_key(tmp_path):
    res = _run(tmp_path, LOCAL_JOB, {"KVFRAME_TIMELINE": "trace.json"})
    assert res.returncode == 0, res.stderr
    path = tmp_path / "trace.worker0.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.worker0.json"]
    events = json.loads(path.read_text())  # closed at exit: valid JSON (Chrome's JSON Array Format)
    ops = [e for e in events if e["ph"] == "X" and e["cat"] == "op"]
    pushes = Counter((e["args"]["key"], e["args"]["bytes"]) for e in ops if e["name"] == "push")
    assert pushes == {("w", 160): 3, ("b", 24): 3, ("w", 8): 1}, pushes  # 2 devices x 80 bytes; the refused one
    refused = [e for e in ops if e["name"] == "push" and e["args"]["bytes"] == 8]
    assert refused[0]["args"]["error"] == "ShapeMismatchError"
    by_name = Counter((e["name"], e["args"]["key"]) for e in ops)
    for name, key in [("init", "w"), ("init", "b"), ("pull", "w"), ("pushpull", "w"), ("pushpull", "b"),
                      ("broadcast", "c"), ("init", "r"), ("row_sparse_pull", "r")]:
        assert by_name[(name, key)] == 1, (name, key, by_name)
    pp = [e for e in ops if e["name"] == "pushpull"]
    assert {e["args"]["keys"] for e in pp} == {2} and len({(e["ts"], e["dur"]) for e in pp}) == 1
    meta = {e["name"]: e for e in events if e["ph"] == "M"}
    assert meta["process_name"]["args"]["name"] == "worker 0"
    assert meta["kvframe_clock"]["args"]["wall_time_us"] > 1.6e15
    # merged: one process, on one clock, in Perfetto's shape
    out = tmp_path / "merged.json"
    assert cli.main(["timeline", str(tmp_path / "trace.json"), "-o", str(out)]) == 0
    doc = json.load(out.open())
    _check_shape(doc)
    _monotonic_per_process(doc)


def test_span_api_records_phases_in_process(tmp_path):
    base = str(tmp_path / "inproc") + "/"
    assert timeline.start(base)
    try:
        timeline.name_process("worker", 7)
        kv = kvframe.create("local")
        kv.init(3, np.zeros(4, np.float32))
        kv.push(3, np.ones(4, np.float32))
        with timeline.span("reduce", key=3, nbytes=16, devices=2) as s:
            s.set(note="x")
        t0 = timeline.now()
        timeline.complete("compress", t0, key=3, nbytes=16, out_bytes=2)
        kv.close()
    finally:
        written = timeline.close()
    assert timeline.enabled is False
    assert written == str(tmp_path / "inproc" / "worker7.json")
    events = json.load(open(written))
    names = [(e["name"], e.get("cat")) for e in events if e["ph"] == "X"]
    assert ("push", "op") in names and ("reduce", "phase") in names and ("compress", "phase") in names
    red = next(e for e in events if e["name"] == "reduce" and "note" in e["args"])
    assert red["args"] == {"key": 3, "bytes": 16, "devices": 2, "note": "x"}


def test_a_killed_process_leaves_a_readable_file(tmp_path):
    # flushed, then gone without closing (os._exit): no closing bracket; SIGTERM: closed on the way out
    code = """
        import os, signal, sys, numpy as np, kvframe
        from kvframe import timeline
        kv = kvframe.create("local")
        kv.init(0, np.zeros(3, np.float32))
        for _ in range(5):
            kv.push(0, np.ones(3, np.float32))
        if sys.argv[-1] == "exit":
            timeline.flush()
            os._exit(3)
        os.kill(os.getpid(), signal.SIGTERM)
        import time; time.sleep(5)
    """
    for how in ("exit", "term"):
        full = {**{k: v for k, v in os.environ.items() if k != "KVFRAME_LOG_LEVEL"},
                "KVFRAME_TIMELINE": str(tmp_path / how / "t.json")}
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), how], env=full, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == (3 if how == "exit" else -signal.SIGTERM), res.stderr
        path = tmp_path / how / "t.worker0.json"
        text = path.read_text()
        if how == "term":
            json.loads(text)
        else:
            assert not text.rstrip().endswith("]")
            with pytest.raises(ValueError):
                json.loads(text)
        events, notes = timeline.read_events(str(path))
        assert sum(1 for e in events if e.get("name") == "push") == 5, (how, notes)
        assert bool(notes) == (how == "exit")


def _fake(path: Path, role: str, rank: int, wall_us: float, spans: list[tuple[str, float, float]],
          close: bool = True, torn: bool = False) -> None:
    pid = 1000 + rank + (50 if role == "server" else 0)
    lines = [{"ph": "M", "name": "kvframe_clock", "pid": pid, "tid": 0, "ts": 0,
              "args": {"wall_time_us": wall_us, "role": role, "rank": rank}},
             {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": 0, "args": {"name": f"{role} {rank}"}}]
    lines += [{"name": n, "cat": "op", "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": 5, "args": {"key": 1}}
              for n, ts, dur in spans]
    text = "[\n" + json.dumps(lines[0]) + "\n" + "".join("," + json.dumps(e) + "\n" for e in lines[1:])
    if torn:
        text += ',{"name":"push","ph":"X","ts":9'
    path.write_text(text + ("]\n" if close else ""))


def test_merge_aligns_clocks_and_tolerates_cut_files(tmp_path, capsys):
    _fake(tmp_path / "t.worker0.json", "worker", 0, 1_000_000.0, [("push", 50.0, 10.0), ("pull", 10.0, 5.0)])
    _fake(tmp_path / "t.worker1.json", "worker", 1, 1_000_300.0, [("push", 0.0, 10.0)], close=False, torn=True)
    _fake(tmp_path / "t.server0.json", "server", 0, 999_900.0, [("round", 100.0, 20.0)])
    assert cli.main(["timeline", str(tmp_path / "t.json")]) == 0  # default output: t.json
    printed = capsys.readouterr()
    assert "no closing bracket" in printed.err and "t.worker1.json" in printed.err
    lines = printed.out.splitlines()
    assert [ln.split("  ")[0].strip() for ln in lines[:3]] == ["worker 0", "worker 1", "server 0"]
    doc = json.load((tmp_path / "t.json").open())
    _check_shape(doc)
    _monotonic_per_process(doc)
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert sorted(names.values()) == ["server 0", "worker 0", "worker 1"]
    pid = {v: k for k, v in names.items()}
    x = {(names[e["pid"]], e["name"]): e["ts"] for e in doc["traceEvents"] if e["ph"] == "X"}
    # ts 0 is the earliest start (server 0's, at 999_900 us); each file shifted by its own start
    assert x[("server 0", "round")] == 100.0
    assert x[("worker 0", "pull")] == 110.0 and x[("worker 0", "push")] == 150.0
    assert x[("worker 1", "push")] == 400.0
    assert len({pid["worker 0"], pid["worker 1"], pid["server 0"]}) == 3
    # merging again (the merged file now exists under the KVFRAME_TIMELINE name) reads the parts, not it
    assert cli.main(["timeline", str(tmp_path / "t.json"), "-o", str(tmp_path / "again.json")]) == 0
    assert "3 processes" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["timeline", str(tmp_path / "none.json")]) == 1
    assert "no timeline file" in capsys.readouterr().err
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "b.json").write_text("[]")
    assert cli.main(["timeline", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "-o" in capsys.readouterr().err


def test_process_file_names(tmp_path):
    assert timeline.process_file("trace.json", "worker", 0) == "trace.worker0.json"
    assert timeline.process_file("trace", "server", 2) == "trace.server2.json"
    assert timeline.process_file("out/", "worker", 1) == os.path.join("out/", "worker1.json")
    assert timeline.process_file(str(tmp_path), "worker", 1) == str(tmp_path / "worker1.json")


# a real job ---------------------------------------------------------------------------------------

@pytest.mark.dist
def test_dist_job_timeline_every_push_on_every_worker(tmp_path):
    sys.path.insert(0, str(HERE / "dist"))
    try:
        from dist_helpers import assert_ok, run_job
    finally:
        sys.path.remove(str(HERE / "dist"))
    base = tmp_path / "trace.json"
    job = run_job(tmp_path, """
        kv.init(["a", "b"], [np.zeros(10, np.float32), np.zeros((4, 5), np.float64)])
        for _ in range(3):
            kv.push("a", np.ones(10, np.float32))
            kv.push("b", np.ones((4, 5)))
        out = np.empty(10, np.float32)
        kv.pull("a", out=out)
        assert (out == 2).all(), out
        print("DONE")
        kv.close()
    """, n=2, s=1, env={"KVFRAME_TIMELINE": str(base), "KVFRAME_LOG_LEVEL": ""}, timeout=40)
    assert_ok(job)
    # KVFRAME_LOG_LEVEL empty (unset): servers and the scheduler log INFO, nobody DEBUG
    assert any("serving at" in ln for ln in job.lines("server 0")) and "debug:" not in job.out, job.out
    assert sorted(p.name for p in tmp_path.glob("trace.*.json")) == [
        "trace.server0.json", "trace.worker0.json", "trace.worker1.json"]
    assert "kvframe timeline" in job.out  # the launcher says how to merge
    merged = tmp_path / "merged.json"
    assert cli.main(["timeline", str(base), "-o", str(merged)]) == 0
    with merged.open() as f:
        doc = json.load(f)
    _check_shape(doc)
    _monotonic_per_process(doc)
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert sorted(names.values()) == ["server 0", "worker 0", "worker 1"]
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    for w in ("worker 0", "worker 1"):
        mine = [e for e in spans if names[e["pid"]] == w]
        pushes = Counter((e["args"]["key"], e["args"]["bytes"]) for e in mine if e["name"] == "push")
        assert pushes == {("a", 40): 3, ("b", 160): 3}, (w, pushes)
        assert {e["name"] for e in mine} >= {"init", "push", "pull", "send", "wait", "barrier"}, w
    server = [e for e in spans if names[e["pid"]] == "server 0"]
    rounds = Counter((e["args"]["key"], e["args"]["bytes"], e["args"]["pushes"]) for e in server
                     if e["name"] == "round")
    assert rounds == {("a", 40, 2): 3, ("b", 160, 2): 3}, rounds
    assert {e["name"] for e in server} >= {"receive", "reduce", "round", "reply", "queue"}
    # the phases of a round lie within it
    for r in (e for e in server if e["name"] == "round"):
        red = [e for e in server if e["name"] == "reduce" and e["args"]["key"] == r["args"]["key"]
               and r["ts"] <= e["ts"] and e["ts"] + e["dur"] <= r["ts"] + r["dur"] + 1e-3]
        assert len(red) == 1, r


def test_in_process_stores_record_their_phases(tmp_path):
    code = """
        import numpy as np, kvframe
        kv = kvframe.create("local")
        kv.init("w", np.zeros(8, np.float32))
        kv.push("w", [np.ones(8, np.float32)] * 2)
        kv.set_optimizer("sgd", learning_rate=0.1)
        kv.push("w", np.ones(8, np.float32))
        dev = kvframe.create("device")
        dev.init("g", np.zeros(64, np.float32))
        dev.set_gradient_compression({"type": "2bit", "threshold": 0.5})
        dev.push("g", [np.ones(64, np.float32)] * 4)
    """
    res = _run(tmp_path, code, {"KVFRAME_TIMELINE": "trace.json"})
    assert res.returncode == 0, res.stderr
    events = json.loads((tmp_path / "trace.worker0.json").read_text())
    phases = [(e["name"], e["args"].get("key"), e["args"].get("bytes"), e["args"].get("copies"))
              for e in events if e["ph"] == "X" and e["cat"] == "phase"]
    assert phases == [("reduce", "w", 64, 2), ("assign", "w", None, None), ("reduce", "w", 32, 1),
                      ("update", "w", None, None), ("compress+reduce", "g", 1024, 4)], phases
