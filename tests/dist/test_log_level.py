"""KVFRAME_LOG_LEVEL: every role (worker, server, scheduler, launcher) logs at the level it names."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from dist_helpers import assert_ok, run_job

import kvframe
from kvframe.log import LogLevelError, level_from_env

pytestmark = pytest.mark.dist

BODY = """
    kv.init(["a", "b"], [np.zeros(10, np.float32), np.zeros(3, np.float32)])
    kv.push(["a", "b"], [np.ones(10, np.float32), np.ones(3, np.float32)])
    out = np.empty(10, np.float32)
    kv.pull("a", out=out)
    kv.barrier()
    print("DONE")
    kv.close()
"""


def test_debug_lines_from_every_role(tmp_path):
    job = run_job(tmp_path, BODY, n=2, s=1, env={"KVFRAME_LOG_LEVEL": "debug"}, timeout=40)
    assert_ok(job)
    worker = job.lines("worker 0")
    server = job.lines("server 0")
    scheduler = job.lines("scheduler")
    debug = "debug: "
    assert any(debug in ln and "registered" in ln for ln in worker), job.out
    assert any(debug in ln and "waiting at the barrier" in ln for ln in worker), job.out
    assert any(debug in ln and "connected to" in ln for ln in worker), job.out
    assert any(debug in ln and "accepted a connection" in ln for ln in server), job.out
    assert any(debug in ln and "round of key 'a' complete: 2 pushes, 40 bytes" in ln for ln in server), job.out
    assert any(debug in ln and "push of 2 key shards" in ln for ln in server), job.out
    assert any(debug in ln and "registered a worker" in ln for ln in scheduler), job.out
    assert any(debug in ln and "barrier: every worker came" in ln for ln in scheduler), job.out
    assert any(debug in ln and "shutting down" in ln for ln in scheduler), job.out
    assert any(debug in ln and "shutting down" in ln for ln in server), job.out
    assert "kvframe launch: debug: started worker 0" in job.out
    assert any("serving at" in ln for ln in server)  # INFO stays


def test_warning_drops_info_lines(tmp_path):
    job = run_job(tmp_path, BODY, n=2, s=1, env={"KVFRAME_LOG_LEVEL": "WARNING"}, timeout=40)
    assert_ok(job)
    assert not any("serving at" in ln for ln in job.lines("server 0")), job.out  # INFO by default
    assert not any("registered" in ln or "closed" in ln for ln in job.lines("scheduler")), job.out
    assert "debug:" not in job.out


def test_a_bad_value_fails_fast(tmp_path, monkeypatch):
    env = {**os.environ, "KVFRAME_LOG_LEVEL": "loud"}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "kvframe_launch", "-n", "1", "--", sys.executable, "-c",
                          "print('never')"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res
    assert "KVFRAME_LOG_LEVEL='loud'" in res.stderr and "DEBUG, INFO, WARNING, ERROR" in res.stderr, res.stderr
    assert "never" not in res.stdout
    assert time.monotonic() - t0 < 15
    res = subprocess.run([sys.executable, "-m", "kvframe_dist.server"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "KVFRAME_LOG_LEVEL" in res.stderr, res
    monkeypatch.setenv("KVFRAME_LOG_LEVEL", "verbose")
    with pytest.raises(LogLevelError, match="KVFRAME_LOG_LEVEL='verbose' is not a log level; use one of DEBUG"):
        kvframe.create("local")
    monkeypatch.setenv("KVFRAME_LOG_LEVEL", "Error")
    assert level_from_env() == 40
