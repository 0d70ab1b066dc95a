"""Helpers for the dist tests: run a real job (scheduler, servers, workers) on loopback with
kvframe-launch, bounded in time, and check that it left no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PRELUDE = """
import os, sys, time, json
import numpy as np
import kvframe
from kvframe.errors import RemoteError, KVTimeoutError
KVTYPE = os.environ.get("KVTYPE", "dist_sync")
kv = kvframe.create(KVTYPE, **json.loads(os.environ.get("KVOPTS", "{}")))
rank, nw = kv.rank, kv.num_workers

def expect_raises(exc_type, fn, *args, match=None, **kw):
    try:
        fn(*args, **kw)
    except exc_type as exc:
        if match is not None and match not in str(exc):
            raise AssertionError(f"error {exc!r} does not mention {match!r}")
        return exc
    raise AssertionError(f"{fn} did not raise {exc_type.__name__}")
"""


@dataclass
class Job:
    rc: int
    out: str
    seconds: float

    def lines(self, who: str) -> list[str]:
        return [ln[len(who) + 3:] for ln in self.out.splitlines() if ln.startswith(f"[{who}] ")]


def _leftovers(token: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if token.encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def run_job(tmp_path: Path, body: str, n: int = 2, s: int = 2, env: dict | None = None, timeout: float = 60,
            launcher_args: tuple = (), prelude: bool = True) -> Job:
    script = tmp_path / f"job_{uuid.uuid4().hex[:8]}.py"
    script.write_text((PRELUDE if prelude else "") + textwrap.dedent(body))
    token = f"kvframe-test-{uuid.uuid4().hex}"
    full_env = {**os.environ, "KVFRAME_HEARTBEAT_INTERVAL": "0.25", "KVFRAME_HEARTBEAT_TIMEOUT": "3",
                "KVFRAME_TIMEOUT": "30", "KVFRAME_CONNECT_TIMEOUT": "30", "KVFRAME_TEST_TOKEN": token,
                "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    cmd = [sys.executable, "-m", "kvframe_launch", "-n", str(n), "-s", str(s), *launcher_args, "--",
           sys.executable, str(script)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for pid in _leftovers(token):
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the job did not finish within {timeout} s; output:\n{out}")
    seconds = time.monotonic() - t0
    time.sleep(0.1)
    left = _leftovers(token)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the job left processes behind: {left}\n{out}"
    return Job(proc.returncode, out, seconds)


def assert_ok(job: Job, n: int = 2) -> None:
    assert job.rc == 0, job.out
    for r in range(n):
        assert "DONE" in job.lines(f"worker {r}"), job.out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
