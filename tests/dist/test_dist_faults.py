"""Faults and hostile input: dead nodes are reported within the heartbeat bound, early finishers do
not deadlock barriers, bad messages leave servers serving, the launcher's exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from dist_helpers import HERE, assert_ok, free_port, run_job

pytestmark = pytest.mark.dist


def test_killing_a_server_fails_the_workers_within_the_bound(tmp_path):
    job = run_job(tmp_path, """
        kv.init(0, np.zeros(10, np.float32))           # key 0 lives on server 0
        stats = kv.backend.server_stats()
        kv.barrier()
        if rank == 0:
            os.kill(stats[0]["pid"], 9)
        t0 = time.monotonic()
        out = np.empty(10, np.float32)
        try:
            while time.monotonic() - t0 < 25:
                kv.push(0, np.ones(10, np.float32))
                kv.pull(0, out=out)
        except RemoteError as exc:
            print(f"CAUGHT after {time.monotonic() - t0:.2f} s: {exc}", flush=True)
            sys.exit(3)
        print("NOT CAUGHT")
    """, timeout=60)
    assert job.rc == 137, job.out                      # the first to fail: server 0, killed by signal 9
    for r in range(2):
        caught = [ln for ln in job.lines(f"worker {r}") if ln.startswith("CAUGHT")]
        assert caught, job.out
        secs = float(re.search(r"after ([\d.]+) s", caught[0]).group(1))
        assert secs < 3 + 7, caught                    # heartbeat timeout 3 s, plus slack for a loaded machine
        assert re.search(r"server 0 at tcp://127\.0\.0\.1:\d+ stopped: no heartbeat", caught[0]), caught
    assert "[kvframe-launch] server 0 exited with status 137" in job.out


def test_killing_the_scheduler_fails_workers_and_servers_within_the_bound(tmp_path):
    job = run_job(tmp_path, """
        kv.init(0, np.zeros(10, np.float32))
        out = np.empty(10, np.float32)
        t0 = time.monotonic()
        try:
            kv.barrier()        # the kill may come before the scheduler's answer reaches worker 1
            if rank == 0:
                os.kill(kv.backend.scheduler_pid, 9)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 25:
                kv.pushpull(0, np.ones(10, np.float32), out=out)
                time.sleep(0.01)
        except RemoteError as exc:
            print(f"CAUGHT after {time.monotonic() - t0:.2f} s: {exc}", flush=True)
            sys.exit(3)
        print("NOT CAUGHT")
    """, timeout=60)
    assert job.rc == 137, job.out
    for r in range(2):
        caught = [ln for ln in job.lines(f"worker {r}") if ln.startswith("CAUGHT")]
        assert caught and re.search(r"the scheduler at tcp://127\.0\.0\.1:\d+ stopped", caught[0]), job.out
        assert float(re.search(r"after ([\d.]+) s", caught[0]).group(1)) < 3 + 7, caught
    for r in range(2):
        assert any("the scheduler at" in ln and "stopped" in ln for ln in job.lines(f"server {r}")), job.out


def test_a_dead_worker_releases_the_others_barrier_with_a_clear_error(tmp_path):
    job = run_job(tmp_path, """
        if rank == 1:
            os._exit(5)                                   # dies without closing
        t0 = time.monotonic()
        try:
            kv.barrier()
        except RemoteError as exc:
            print(f"CAUGHT after {time.monotonic() - t0:.2f} s: {exc}", flush=True)
            sys.exit(4)
    """, timeout=60)
    assert job.rc == 5, job.out
    caught = [ln for ln in job.lines("worker 0") if ln.startswith("CAUGHT")]
    assert caught and "worker 1" in caught[0] and "stopped" in caught[0], job.out


def test_a_worker_that_finished_early_does_not_deadlock_a_barrier(tmp_path):
    job = run_job(tmp_path, """
        if rank == 1:
            kv.close()
            print("DONE")
            sys.exit(0)
        time.sleep(0.5)
        exc = expect_raises(RemoteError, kv.barrier, match="worker 1")
        assert "closed its store" in str(exc), exc
        print("DONE")
    """)
    assert_ok(job)


def test_a_pull_waiting_for_a_worker_that_finished_fails_clearly(tmp_path):
    job = run_job(tmp_path, """
        kv.init(0, np.zeros(4, np.float32))
        if rank == 1:
            kv.close()
            print("DONE")
            sys.exit(0)
        t0 = time.monotonic()
        kv.push(0, np.ones(4, np.float32))       # the round needs worker 1's push too
        exc = expect_raises(RemoteError, kv.pull, 0, out=np.empty(4, np.float32), match="worker 1")
        assert "closed its store" in str(exc) and time.monotonic() - t0 < 10, exc
        print("DONE")
    """)
    assert_ok(job)


def test_malformed_and_unauthenticated_messages_leave_the_server_serving(tmp_path):
    job = run_job(tmp_path, """
        import socket
        from urllib.parse import urlsplit
        from kvframe_dist.endpoint import Endpoint, make_transport
        from kvframe_dist.wire import Message
        kv.init(0, np.zeros(10, np.float32))
        kv.barrier()
        if rank == 0:
            addr = kv.backend.server_addrs[0]
            u = urlsplit(addr)
            with socket.create_connection((u.hostname, u.port)) as raw:   # bytes that are no message at all
                raw.sendall(b"garbage" * 100)
            from kvframe_dist.endpoint import Refused
            def endpoint(secret):
                ep = Endpoint(make_transport(os.environ.get("KVFRAME_TRANSPORT", "tcp")), secret, "test")
                return ep, ep.connect(addr)
            for secret in (b"not-the-secret", None):   # the refused peer learns why
                exc = expect_raises(Refused, endpoint, secret, match="authentication failed")
                print("REFUSED", exc)
            good, gs = endpoint(os.environ["KVFRAME_SECRET"].encode())
            def ask(op, fields, frames=()):
                good.send(gs, Message(op, fields, list(frames)))
                got = good.recv(5)
                assert got is not None, (op, fields)
                return got[1]
            bad = [
                ("push", {"id": 3, "keys": [0], "sync": True}, [np.zeros(3, np.float32)], "expected 10"),
                ("push", {"id": 4, "keys": [999], "sync": True}, [np.zeros(10, np.float32)], "unknown key 999"),
                ("init", {"id": 5, "keys": [50], "parts": [0], "dtypes": ["complex64"], "shapes": [[2]],
                          "names": [None]}, [b"x" * 16], "cannot travel"),
                ("init", {"id": 6, "keys": [51], "parts": [0], "dtypes": ["float32"], "shapes": [[4]],
                          "names": [None]}, [b"x" * 12], "expected 4"),
                ("push", {"id": 10, "keys": [0], "encs": ["c:object"], "sync": True}, [b"1234"], "compress"),
                ("rsp_pull", {"id": 11, "keys": [0], "sync": True}, [np.array([100], np.int64)], "outside"),
                ("push", {"id": 12, "keys": [0, 0], "parts": [0], "sync": True}, [], "2 keys but 1 parts"),
                ("welcome", {"rank": 0, "servers": [], "num_workers": 1, "num_servers": 1, "pid": 1}, [],
                 "does not take 'welcome'"),
                ("pull", {"id": 13, "keys": [0] * 50000, "sync": True}, [], "named more than once"),
                ("rsp_pull", {"id": 14, "keys": [0], "sync": True}, [np.zeros(9, np.int64)], "each once"),
            ]
            for op, fields, frames, words in bad:
                reply = ask(op, fields, frames)
                assert reply.op == "error" and words in reply["msg"], (op, fields, reply)
                assert reply.get("id") == fields.get("id"), reply
            # messages that break the wire format (signed in the session) are dropped: no answer
            from kvframe_dist import wire
            session = good._sessions[gs]
            for header in (b'KVF\x02{"op": "frobnicate", "id": 9}', b"KVF\x02" + b"[" * 100000, b"KVF\x01{}"):
                good.transport.send(gs, [header, wire._mac(session.send_key, session.send_seq, [header])])
                session.send_seq += 1
            assert good.recv(0.5) is None
            st = kv.backend.server_stats()[0]
            assert st["dropped"] >= 5 and st["errors"] == len(bad), st
            print("server 0 dropped", st["dropped"], "and refused", st["errors"])
        kv.barrier()
        out = np.empty(10, np.float32)
        kv.pushpull(0, np.full(10, 2.0, np.float32), out=out)
        assert (out == 4).all(), out
        print("DONE")
    """, env={"KVFRAME_SECRET": "s3cret"})
    assert_ok(job)
    assert "bad MAC" in job.out


def test_replayed_messages_have_no_effect(tmp_path):
    """A captured push, sent again on its connection or on a new one, changes nothing and stalls
    nothing (the first build applied it twice and stalled a worker for 40 s)."""
    job = run_job(tmp_path, """
        from kvframe_dist.endpoint import Endpoint, make_transport
        kv.init(0, np.zeros(4, np.float32))
        sent = []
        transport = kv.backend.ep.transport
        real_send = transport.send
        def recording_send(peer, frames):   # what an eavesdropper on the link would capture
            sent.append((peer, [bytes(memoryview(f).cast("B")) for f in frames]))
            real_send(peer, frames)
        transport.send = recording_send
        out = np.empty(4, np.float32)
        kv.pushpull(0, np.full(4, 1.0 + rank, np.float32), out=out)
        assert (out == 3).all(), out
        transport.send = real_send
        kv.barrier()
        if rank == 0:
            for peer, frames in sent:                 # again, on the same connections
                real_send(peer, frames)
            other = make_transport(os.environ.get("KVFRAME_TRANSPORT", "tcp"))
            for peer, frames in sent:                 # and on new connections, with no handshake
                other.send(other.connect(kv.backend.ep.name(peer)), frames)
            time.sleep(0.5)
            other.close()
        kv.barrier()
        kv.pull(0, out=out)
        assert (out == 3).all(), out                 # no replayed push was summed
        t0 = time.monotonic()
        kv.pushpull(0, np.full(4, 10.0, np.float32), out=out)
        assert (out == 20).all() and time.monotonic() - t0 < 2, out   # and no round was disturbed
        if rank == 0:
            st = kv.backend.server_stats()
            assert sum(s["dropped"] for s in st) >= 2, st
        print("DONE")
    """, env={"KVFRAME_SECRET": "replay-test"})
    assert_ok(job)


def test_launcher_exits_with_the_first_failing_code_and_stops_the_rest(tmp_path):
    job = run_job(tmp_path, """
        if rank == 1:
            sys.exit(7)
        time.sleep(60)                                     # stopped by the launcher, not finished
    """, launcher_args=("--grace", "1"), timeout=40)
    assert job.rc == 7, job.out
    assert job.seconds < 20, job.seconds
    assert "stopping: " in job.out and "worker 0" in job.out.split("stopping: ")[-1]


def test_roles_started_on_their_own_with_mxnet_variables(tmp_path):
    """scheduler and servers as `python -m`, workers as plain processes: only DMLC_* variables; one
    server is the worker script itself with DMLC_ROLE=server (as MXNet's launch.py runs it)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import numpy as np, kvframe
        kv = kvframe.create("dist_sync")
        kv.init(0, np.zeros(4, np.float32))
        out = np.empty(4, np.float32)
        kv.pushpull(0, np.ones(4, np.float32), out=out)
        assert (out == 2).all()
        print("DONE", kv.rank, flush=True)
        kv.close()
    """))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVFRAME_", "DMLC_"))}
    env.update(DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(port), DMLC_NUM_SERVER="2", DMLC_NUM_WORKER="2",
               KVFRAME_CONNECT_TIMEOUT="20", KVFRAME_TIMEOUT="20")
    py = sys.executable
    cmds = [([py, "-m", "kvframe_dist.scheduler"], "scheduler"),
            ([py, "-m", "kvframe_dist", "--role", "server"], "server"),
            ([py, str(script)], "server"),
            ([py, str(script)], "worker"), ([py, str(script)], "worker")]
    procs = [subprocess.Popen(c, env={**env, "DMLC_ROLE": role}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c, role in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=40)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 5, outs
    assert sorted(o.split("DONE ")[1].split()[0] for o in outs[3:]) == ["0", "1"], outs


def test_missing_variables_give_a_clear_error(monkeypatch):
    import kvframe

    for k in list(os.environ):
        if k.startswith(("KVFRAME_", "DMLC_")):
            monkeypatch.delenv(k)
    with pytest.raises(ValueError, match="DMLC_PS_ROOT_PORT"):
        kvframe.create("dist_sync")


def test_ssh_and_mpi_command_lines(tmp_path):
    from kvframe_launch import launch

    hosts = tmp_path / "hosts"
    hosts.write_text("# cluster\nnode1\nnode2 slots=2\n")
    args = launch.parse_args(["-n", "3", "-s", "2", "--launcher", "ssh", "-H", str(hosts), "--host-ip", "10.0.0.1",
                              "--port", "9191", "--config", "job.toml", "--", "python", "train.py", "--lr", "0.1"])
    procs = launch.build(args)
    assert [p.name for p in procs] == ["scheduler", "server 0", "server 1", "worker 0", "worker 1", "worker 2"]
    assert procs[0].env["DMLC_ROLE"] == "scheduler" and procs[0].env["DMLC_PS_ROOT_URI"] == "10.0.0.1"
    w2 = procs[5].argv
    assert w2[:6] == ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes", "node2"]
    assert procs[1].argv[5] == "node1" and procs[2].argv[5] == "node2" and procs[3].argv[5] == "node2"
    remote = w2[6]
    for part in ("DMLC_ROLE=worker", "KVFRAME_RANK=2", "DMLC_PS_ROOT_PORT=9191", "DMLC_NUM_WORKER=3",
                 "DMLC_NUM_SERVER=2", f"KVFRAME_CONFIG={os.path.abspath('job.toml')}", "python train.py --lr 0.1"):
        assert part in remote, remote
    assert f"; cd {os.getcwd()} && env " in remote and remote.startswith("IFS= read -r KVFRAME_SECRET")

    args = launch.parse_args(["-n", "4", "-s", "2", "--launcher", "mpi", "-H", str(hosts), "--host-ip", "10.0.0.1",
                              "--", "python", "train.py"])
    procs = launch.build(args)
    assert [p.name for p in procs] == ["scheduler", "servers", "workers"]
    srv, wrk = procs[1].argv, procs[2].argv
    assert srv[:5] == ["mpirun", "--allow-run-as-root", "-np", "2", "--hostfile"]
    assert srv[-4:] == ["-m", "kvframe_dist", "--role", "server"] and wrk[-2:] == ["python", "train.py"]
    assert "DMLC_ROLE=worker" in wrk and "KVFRAME_RANK_FROM_MPI=1" in wrk and "DMLC_NUM_WORKER=4" in wrk

    out = subprocess.run([sys.executable, "-m", "kvframe_launch", "-n", "2", "--dry-run", "--", "python", "x.py"],
                         capture_output=True, text=True, timeout=30, cwd=HERE)
    assert out.returncode == 0 and "# worker 1" in out.stdout and "DMLC_ROLE=server" in out.stdout, out


def test_launcher_refuses_bad_arguments():
    for argv in (["-n", "2"], ["-n", "0", "--", "x"], ["-n", "2", "--launcher", "ssh", "--", "x"]):
        res = subprocess.run([sys.executable, "-m", "kvframe_launch", *argv], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 2, (argv, res.stderr)


def test_launcher_with_a_missing_worker_command_leaves_nothing_behind(tmp_path):
    token = "kvframe-test-missing-cmd"
    env = {**os.environ, "KVFRAME_TEST_TOKEN": token}
    res = subprocess.run([sys.executable, "-m", "kvframe_launch", "-n", "1", "-s", "1", "--",
                          str(tmp_path / "no-such-program")], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 127 and "cannot start worker 0" in res.stdout, (res.stdout, res.stderr)
    from dist_helpers import _leftovers

    assert _leftovers(token) == []


def test_a_role_without_its_variables_says_which_are_missing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVFRAME_", "DMLC_"))}
    res = subprocess.run([sys.executable, "-m", "kvframe_dist.server"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert res.returncode == 2 and "DMLC_PS_ROOT_PORT" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_flood_of_unauthenticated_messages_leaves_server_memory_and_log_bounded(tmp_path):
    """The first build: one 256 MiB bad message took a server from 52 to 307 MB RSS, and 15 s floods
    of bad-MAC messages to 525 MB (never given back) with 1.7 million log lines."""
    job = run_job(tmp_path, """
        import socket, struct, threading
        from urllib.parse import urlsplit
        from kvframe_dist.endpoint import Endpoint, Refused, make_transport
        kv.init(0, np.zeros(10, np.float32))
        kv.barrier()
        if rank == 0:
            stats = kv.backend.server_stats()[0]
            u = urlsplit(stats["addr"])
            def rss_mb():
                with open(f"/proc/{stats['pid']}/status") as f:
                    return int(next(ln for ln in f if ln.startswith("VmRSS")).split()[1]) / 1024
            before, peak = rss_mb(), 0.0
            stop = time.monotonic() + 5
            counts = {"big": 0, "garbage": 0, "hello": 0}
            def big():   # a 256 MiB message announced on a fresh connection, never authenticated
                while time.monotonic() < stop:
                    try:
                        with socket.create_connection((u.hostname, u.port), timeout=2) as s:
                            s.sendall(b"KVFT" + struct.pack("<BBHI", 1, 0, 0, 1) + struct.pack("<Q", 256 << 20))
                            s.sendall(b"\\0" * (1 << 20))
                            counts["big"] += 1
                    except OSError:
                        pass
            def garbage():
                while time.monotonic() < stop:
                    try:
                        with socket.create_connection((u.hostname, u.port), timeout=2) as s:
                            s.sendall(os.urandom(4096))
                            counts["garbage"] += 1
                    except OSError:
                        pass
            def wrong_secret():
                while time.monotonic() < stop:
                    ep = Endpoint(make_transport(os.environ.get("KVFRAME_TRANSPORT", "shm")), b"wrong", "intruder")
                    try:
                        ep.connect(stats["addr"])
                    except (Refused, OSError, kvframe.errors.KVFrameError):
                        counts["hello"] += 1
                    finally:
                        ep.close()
            threads = [threading.Thread(target=f) for f in (big, garbage, wrong_secret)]
            for t in threads:
                t.start()
            while time.monotonic() < stop:
                peak = max(peak, rss_mb())
                time.sleep(0.05)
            for t in threads:
                t.join()
            print("FLOOD", counts, f"rss {before:.0f} -> peak {peak:.0f} MB", flush=True)
            assert peak - before <= 50, (before, peak)
        kv.barrier()
        out = np.empty(10, np.float32)
        kv.pushpull(0, np.full(10, 2.0, np.float32), out=out)
        assert (out == 4).all(), out
        print("DONE")
    """, env={"KVFRAME_SECRET": "flood-test"}, timeout=90)
    assert_ok(job)
    server_lines = len(job.lines("server 0"))
    assert server_lines < 200, f"{server_lines} log lines from the flooded server"
