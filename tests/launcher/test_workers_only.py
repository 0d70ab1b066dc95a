"""kvframe-launch as its own distribution: workers-only jobs (``-s 0``) for stores without servers, the
command lines they make under ssh and mpi, and the old ``python -m kvframe_dist.launch``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kvframe_launch import launch

PY = sys.executable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "dist"))
from dist_helpers import _leftovers  # noqa: E402 - found through the line above

WORKER = str(HERE / "workers_only_worker.py")  # prints RESULT {...}: its variables, what nccl reads, a rendezvous
HAS_NCCL = importlib.util.find_spec("kvframe_nccl") is not None


def _run(args: list[str], env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """kvframe-launch ARGS (as ``python -m kvframe_launch``), and its duration; checks that it left no process."""
    token = f"kvframe-test-{uuid.uuid4().hex}"
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KVFRAME_", "DMLC_"))}
    full.update({"KVFRAME_TEST_TOKEN": token, **(env or {})})
    t0 = time.monotonic()
    try:
        res = subprocess.run([PY, "-m", "kvframe_launch", *args], env=full, capture_output=True, text=True,
                             timeout=timeout)
    finally:
        seconds = time.monotonic() - t0
        time.sleep(0.1)
        left = _leftovers(token)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"the job left processes behind: {left}"
    return res, seconds


def _results(out: str) -> dict[int, dict]:
    got = {}
    for ln in out.splitlines():
        if ln.startswith("[worker ") and "RESULT {" in ln:
            got[int(ln[len("[worker "):ln.index("]")])] = json.loads(ln.partition("RESULT ")[2])
    return got


def _free_pair() -> int:
    return launch.free_port_pair("127.0.0.1")


@pytest.mark.parametrize("given_secret", [None, "a-secret-from-the-user"])
def test_workers_only_job_gives_each_worker_its_rank_world_and_rendezvous(given_secret):
    port = _free_pair()
    env = {"KVFRAME_SECRET": given_secret} if given_secret else {}
    res, seconds = _run(["-n", "2", "-s", "0", "--port", str(port), "--", PY, WORKER], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    # no scheduler and no server: only the two workers' lines (and none of the launcher's)
    assert {ln.split("]")[0] + "]" for ln in res.stdout.splitlines()} == {"[worker 0]", "[worker 1]"}, res.stdout
    got = _results(res.stdout)
    assert sorted(got) == [0, 1], res.stdout
    for rank in (0, 1):
        r = got[rank]
        assert {k: v for k, v in r.items() if k.startswith("KVFRAME_") and k != "KVFRAME_TEST_TOKEN"} == {
            "KVFRAME_ROLE": "worker", "KVFRAME_RANK": str(rank), "KVFRAME_WORLD_SIZE": "2",
            "KVFRAME_NUM_WORKERS": "2", "KVFRAME_NUM_SERVERS": "0", "KVFRAME_LOCAL_RANK": str(rank),
            "KVFRAME_ROOT_URI": "127.0.0.1", "KVFRAME_ROOT_PORT": str(port), "KVFRAME_RANK_FROM_MPI": None}
        assert ("nccl" in r) == HAS_NCCL, r
        if HAS_NCCL:  # store 'nccl' reads rank, world, local rank and its rendezvous (port + 1) from them
            assert r["nccl"] == [rank, 2, rank, "KVFRAME", "127.0.0.1", port + 1]
            assert r["uid"] == hashlib.sha256(bytes(range(128))).hexdigest()
    # one secret for the job, the same in every worker: the user's, else a fresh one
    assert got[0]["secret"] is not None and got[0]["secret"] == got[1]["secret"]
    if given_secret:
        assert got[0]["secret"] == hashlib.sha256(given_secret.encode()).hexdigest()
    assert seconds < 30, seconds


def test_workers_only_picks_a_free_port_whose_next_port_is_free():
    res, _ = _run(["-n", "3", "-s", "0", "--", PY, WORKER])
    assert res.returncode == 0, res.stdout + res.stderr
    got = _results(res.stdout)
    ports = {r["KVFRAME_ROOT_PORT"] for r in got.values()}
    assert sorted(got) == [0, 1, 2] and len(ports) == 1, res.stdout
    assert 0 < int(ports.pop()) < 65535


def test_a_failing_worker_ends_a_workers_only_job_quickly():
    code = "import os, sys, time\nif os.environ['KVFRAME_RANK'] == '1':\n    sys.exit(3)\ntime.sleep(120)\n"
    res, seconds = _run(["-n", "2", "-s", "0", "--", PY, "-c", code], timeout=60)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "[kvframe-launch] worker 1 exited with status 3; waiting up to 5 s for the others" in res.stdout
    assert res.stdout.splitlines()[-1] == ("[kvframe-launch] job failed, exit status 3: worker 1 exited with status "
                                           "3, the first to fail"), res.stdout
    assert seconds < 15, seconds  # 5 s of grace, then SIGTERM


def test_a_store_with_servers_refuses_a_workers_only_job():
    code = "import kvframe\nkvframe.create('dist_sync')\n"
    res, seconds = _run(["-n", "1", "-s", "0", "--", PY, "-c", code])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "need at least one server" in res.stdout, res.stdout
    assert seconds < 30


def test_workers_only_command_lines_under_ssh_and_mpi(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=2\nuser@node2:2200\n")
    monkeypatch.setenv("KVFRAME_SECRET", "s" * 32)
    monkeypatch.delenv("KVFRAME_SSH", raising=False)
    args = launch.parse_args(["-n", "4", "-s", "0", "--launcher", "ssh", "-H", str(hosts), "--port", "29400",
                              "--", "python", "train.py"])
    procs = launch.build(args)
    assert [p.name for p in procs] == ["worker 0", "worker 1", "worker 2", "worker 3"]
    # round-robin from the first host: node1, node1, node2, node1; worker 0's host is the rendezvous
    assert [p.argv[-2] for p in procs] == ["node1", "node1", "user@node2", "node1"]
    for rank, local in enumerate([0, 1, 0, 2]):
        remote = procs[rank].argv[-1]
        for part in (f"KVFRAME_RANK={rank}", f"KVFRAME_LOCAL_RANK={local}", "KVFRAME_WORLD_SIZE=4",
                     "KVFRAME_NUM_WORKERS=4", "KVFRAME_NUM_SERVERS=0", "KVFRAME_ROOT_URI=node1",
                     "KVFRAME_ROOT_PORT=29400", "KVFRAME_ROLE=worker"):
            assert part in remote.split(), (part, remote)
        assert "s" * 32 not in remote
    # --host-ip names the rendezvous host; a hostfile of this host only gives loopback
    args = launch.parse_args(["-n", "1", "-s", "0", "--launcher", "ssh", "-H", str(hosts), "--host-ip", "10.0.0.9",
                              "--", "x"])
    assert launch.build(args)[0].argv[-1].count("KVFRAME_ROOT_URI=10.0.0.9") == 1
    hosts.write_text("localhost\n127.0.0.1:2222\n")
    args = launch.parse_args(["-n", "2", "-s", "0", "--launcher", "ssh", "-H", str(hosts), "--", "x"])
    assert all("KVFRAME_ROOT_URI=127.0.0.1" in p.argv[-1] for p in launch.build(args))

    hosts.write_text("node1 slots=2\nnode2 slots=2\n")
    args = launch.parse_args(["-n", "4", "--num-servers", "0", "--launcher", "mpi", "-H", str(hosts), "--port",
                              "29400", "--", "python", "train.py"])
    procs = launch.build(args)
    assert [p.name for p in procs] == ["workers"]  # one mpirun, no scheduler
    argv = procs[0].argv
    assert argv[:4] == ["mpirun", "--allow-run-as-root", "-np", "4"] and argv[-2:] == ["python", "train.py"]
    for part in ("KVFRAME_RANK_FROM_MPI=1", "KVFRAME_WORLD_SIZE=4", "KVFRAME_NUM_SERVERS=0",
                 "KVFRAME_ROOT_URI=node1", "KVFRAME_ROOT_PORT=29400", "KVFRAME_ROLE=worker"):
        assert part in argv, (part, argv)
    assert not any(a.startswith(("KVFRAME_RANK=", "KVFRAME_LOCAL_RANK=")) for a in argv), argv  # MPI's
    assert "KVFRAME_SECRET" in argv and not any("s" * 32 in a for a in argv)


def test_free_port_pair_leaves_the_next_port_free():
    port = launch.free_port_pair("127.0.0.1")
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", port))
        b.bind(("127.0.0.1", port + 1))  # may race with another program, as any free port


def test_bad_server_counts_are_refused():
    for argv in (["-n", "1", "-s", "-1", "--", "x"], ["-n", "0", "-s", "0", "--", "x"]):
        res = subprocess.run([PY, "-m", "kvframe_launch", *argv], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2, (argv, res.stderr)


def test_the_launcher_imports_no_store_and_the_old_module_still_runs(tmp_path):
    code = ("import sys\nfrom kvframe_launch import launch\n"
            "assert launch.main(['-n', '2', '-s', '0', '--dry-run', '--', 'x']) == 0\n"
            "assert launch.main(['-n', '1', '-s', '1', '--launcher', 'ssh', '-H', sys.argv[1], '--host-ip', "
            "'10.0.0.1', '--dry-run', '--', 'x']) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith(('kvframe_dist', 'kvframe_nccl', 'kvframe_local'))))")
    hosts = tmp_path / "hosts"
    hosts.write_text("node1\n")
    res = subprocess.run([PY, "-c", code, str(hosts)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]", res.stdout
    # python -m kvframe_dist.launch: a thin module that runs this launcher
    res = subprocess.run([PY, "-m", "kvframe_dist.launch", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("kvframe-launch "), res
    res = subprocess.run([PY, "-m", "kvframe_dist.launch", "-n", "2", "-s", "0", "--dry-run", "--", "x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "# worker 1" in res.stdout and "scheduler" not in res.stdout, res
    from kvframe_dist import launch as old

    assert old.main is launch.main and old.build is launch.build
