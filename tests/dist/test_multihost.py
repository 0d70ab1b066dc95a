"""Real multi-host jobs on simulated hosts (tests/dist/netns.py): every role on a host of its own,
each host with its own address on a bridge and its own private /dev/shm.

Topology: scheduler on host 0, servers on hosts 1 and 2, workers on hosts 3 and 4.  Every process
gets MXNet's variables (DMLC_ROLE, DMLC_PS_ROOT_URI = host 0's address, DMLC_PS_ROOT_PORT,
DMLC_NUM_SERVER=2, DMLC_NUM_WORKER=2, DMLC_INTERFACE=eth0), the job's secret (KVFRAME_SECRET; or
KVFRAME_INSECURE=1 and nothing else, in one test) and short heartbeats; servers and the
scheduler run ``python -m kvframe_dist --role ...``, workers tests/dist/multihost_worker.py.

KVFRAME_TEST_NODE_HOST=1 (an infrastructure check for a backend that does not find its address
yet) also gives each process DMLC_NODE_HOST = its host's address.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from netns import Hosts, netns_unavailable  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))]

HB_INTERVAL, HB_TIMEOUT = 0.5, 4.0
LINK_MARGIN = 10.0  # (d): every process must have stopped HB_TIMEOUT + this after the link went down
PORT = 9091
SCHED, SERVERS, WORKERS = 0, (1, 2), (3, 4)
TRANSPORTS = ("tcp", "zmq", "shm")


@functools.cache
def transports_installed() -> tuple:
    from kvframe import plugins

    names = plugins.names("transports")
    if not set(TRANSPORTS) <= set(names):  # some register only once their package is imported
        plugins.load_all()
        names = plugins.names("transports")
    return tuple(names)


def need_transport(name: str) -> None:
    if name not in transports_installed():
        pytest.skip(f"no transport plugin {name!r} installed (installed: {', '.join(transports_installed())})")


@dataclass
class Proc:
    name: str  # "scheduler", "server@1", "worker@3" (role @ host index)
    host: int
    popen: subprocess.Popen
    lines: list = field(default_factory=list)  # (seconds since start, line)
    ended: float | None = None

    @property
    def out(self) -> str:
        return "\n".join(ln for _, ln in self.lines)

    def events(self, kind: str | None = None) -> list[dict]:
        got = []
        for _, ln in self.lines:
            if ln.startswith("KVF "):
                ev = json.loads(ln[4:])
                if kind is None or ev.get("event") == kind:
                    got.append(ev)
        return got


@dataclass
class JobResult:
    procs: list
    shm_seen: dict  # host -> names in its private /dev/shm during the job (sampled, plus inotify's record)
    ips: list
    link_down_at: float | None = None
    isolated: int | None = None
    timed_out: float | None = None  # the deadline, when the job ran past it and was killed

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    @property
    def workers(self) -> list:
        return [p for p in self.procs if p.name.startswith("worker")]

    def dump(self) -> str:
        head = f"=== the job ran past {self.timed_out:.1f} s and was stopped\n" if self.timed_out else ""
        return head + "\n".join(f"--- {p.name} ({self.ips[p.host]}) rc={p.popen.returncode} ended={p.ended}\n{p.out}"
                         for p in self.procs)


def _reader(proc: Proc, t0: float) -> None:
    try:
        for line in proc.popen.stdout:
            proc.lines.append((time.monotonic() - t0, line.rstrip("\n")))
    except (ValueError, OSError):  # the pipe was closed under us by the final clean-up
        pass


def run_job(kvtype: str = "dist_sync", transport: str | None = None, interface: bool = True, rounds: int = 5,
            link_down: str | None = None, extra: dict | None = None, timeout: float = 60,
            secret: str | None = "multihost-test-secret") -> JobResult:
    """Runs one job on 5 simulated hosts; kills everything after ``timeout`` s or as soon as a process
    fails (unless a link is taken down).  ``link_down``: 'host' or 'switch' side of worker host 4's
    link goes down once both workers have done 3 rounds (the workers push until the job fails)."""
    with Hosts(5, hostnames=True) as hosts:
        common = {"DMLC_PS_ROOT_URI": hosts[SCHED].ip, "DMLC_PS_ROOT_PORT": str(PORT), "DMLC_NUM_SERVER": "2",
                  "DMLC_NUM_WORKER": "2", "KVFRAME_HEARTBEAT_INTERVAL": str(HB_INTERVAL),
                  "KVFRAME_HEARTBEAT_TIMEOUT": str(HB_TIMEOUT), "PYTHONUNBUFFERED": "1",
                  "PYTHONFAULTHANDLER": "1", **(extra or {})}  # SIGABRT: every thread's stack, for hangs
        if interface:
            common["DMLC_INTERFACE"] = "eth0"
        if secret is not None:
            common["KVFRAME_SECRET"] = secret
        if transport:
            common["KVFRAME_TRANSPORT"] = transport
        work = {"KVTYPE": kvtype, "ROUNDS": str(rounds), "MODE": "forever" if link_down else "sums"}
        plan = [("scheduler", SCHED, [sys.executable, "-m", "kvframe_dist", "--role", "scheduler"], {})]
        plan += [(f"server@{h}", h, [sys.executable, "-m", "kvframe_dist", "--role", "server"], {}) for h in SERVERS]
        plan += [(f"worker@{h}", h, [sys.executable, str(HERE / "multihost_worker.py")], work) for h in WORKERS]
        t0 = time.monotonic()
        procs, readers = [], []
        for name, h, argv, env in plan:
            role = name.split("@")[0]
            env = {**common, "DMLC_ROLE": role, **env}
            if os.environ.get("KVFRAME_TEST_NODE_HOST") == "1":
                env["DMLC_NODE_HOST"] = hosts[h].ip
            p = Proc(name, h, hosts.popen(h, argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, cwd=str(HERE)))
            procs.append(p)
            readers.append(threading.Thread(target=_reader, args=(p, t0), daemon=True))
            readers[-1].start()
        result = JobResult(procs, {i: set() for i in range(len(hosts))}, hosts.ips)
        deadline = t0 + timeout
        result.timed_out = timeout
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            for p in procs:
                if p.ended is None and p.popen.poll() is not None:
                    p.ended = now
            for i in range(len(hosts)):
                result.shm_seen[i].update(hosts.shm_files(i))
            if all(p.ended is not None for p in procs):
                result.timed_out = None
                break
            if link_down is None and any(p.popen.returncode not in (None, 0) for p in procs):
                time.sleep(1)  # let the others say why, then stop: the job has failed
                result.timed_out = None
                break
            if result.link_down_at is not None and now > result.link_down_at + HB_TIMEOUT + LINK_MARGIN + 2:
                result.timed_out = now  # no need to wait for the full deadline: the check has failed
                break
            if link_down and result.link_down_at is None and \
                    all(any(ev["n"] >= 3 for ev in w.events("round")) for w in result.workers):
                hosts.set_link(WORKERS[1], False, side=link_down)
                result.link_down_at, result.isolated = time.monotonic() - t0, WORKERS[1]
            time.sleep(0.1)
        for i in range(len(hosts)):  # also what came and went between two samples
            result.shm_seen[i].update(hosts.shm_created(i))
        for p in procs:
            if p.ended is None and p.popen.poll() is not None:
                p.ended = time.monotonic() - t0
        hung = [p for p in procs if p.popen.poll() is None]
        for p in hung:  # past the deadline, or the job failed: its stacks (faulthandler), then kill it
            p.lines.append((time.monotonic() - t0, "=== still running: SIGABRT for its stacks"))
            os.kill(p.popen.pid, signal.SIGABRT)
        end = time.monotonic() + 3
        for p in hung:
            try:
                p.popen.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.popen.poll() is None:
                os.killpg(p.popen.pid, signal.SIGKILL)
        for t in readers:
            t.join(5)
    return result  # the hosts are closed: every process is gone with its namespaces


@functools.cache
def sync_job(transport: str) -> JobResult:
    """The dist_sync job of tests (a) and (e), run once per transport."""
    return run_job("dist_sync", transport=transport)


def assert_sums(res: JobResult, rounds: int = 5) -> None:
    for p in res.procs:
        assert p.popen.returncode == 0, f"{p.name} exited with {p.popen.returncode}\n{res.dump()}"
    ranks = set()
    for w in res.workers:
        [r] = w.events("result") or [None]
        assert r is not None, f"{w.name} printed no result\n{res.dump()}"
        assert r["ok"] and not r["mismatches"], f"{w.name}: {r['mismatches']}\n{res.dump()}"
        assert r["rounds"] == rounds
        ranks.add(r["rank"])
        if isinstance(r["server_elements"], list):  # the big key is split over both servers
            assert len(r["server_elements"]) == 2 and min(r["server_elements"]) > 500_000, r["server_elements"]
    assert ranks == {0, 1}


# -- (a) and (e) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sync_exact_sums_across_hosts(transport):
    need_transport(transport)
    assert_sums(sync_job(transport))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_shared_memory_across_hosts(transport):
    need_transport(transport)
    res = sync_job(transport)
    roles = {p.host: p.name for p in res.procs}
    for host, names in res.shm_seen.items():
        # even a file that is removed again (a same-host probe) is one no other host could ever open
        assert not names, (f"host {host} ({roles[host]})'s private /dev/shm held {sorted(names)} during the job"
                           f"\n{res.dump()}")
    for w in res.workers:
        [r] = w.events("result") or [None]
        assert r is not None, f"{w.name} printed no result\n{res.dump()}"
        assert r["dev_shm"] == [], r["dev_shm"]
        info = r["transport_info"]
        assert "transport" in info and "shared_memory_peers" in info, info
        assert info["transport"] == transport, info
        assert not info["shared_memory_peers"], info


# -- (b) -----------------------------------------------------------------------------------------

def test_async_with_optimizer_on_servers():
    res = run_job("dist_async", extra={"KVOPT": "test"})
    assert_sums(res)


# -- (c) -----------------------------------------------------------------------------------------

def test_route_discovery_without_interface():
    res = run_job("dist_sync", interface=False)
    assert_sums(res)


def test_mxnet_variables_alone_with_an_explicit_opt_out_of_authentication():
    """MXNet's variables alone launch a multi-host job once the user says KVFRAME_INSECURE=1;
    without it (and without a secret) every role refuses to start, naming both variables."""
    res = run_job("dist_sync", interface=False, secret=None, extra={"KVFRAME_INSECURE": "1"})
    assert_sums(res)
    res = run_job("dist_sync", secret=None, timeout=20)
    for p in res.procs:
        assert p.popen.returncode not in (0, None), res.dump()
        assert "KVFRAME_SECRET" in p.out and "KVFRAME_INSECURE=1" in p.out, res.dump()


# -- (d) -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["host", "switch"])
def test_link_down_mid_job_names_the_culprit(side):
    """Worker host 4's link goes down after 3 rounds ('host': ``ip link set eth0 down`` there;
    'switch': its bridge port, as a pulled cable).  Everyone must stop, non-zero, within the
    heartbeat timeout plus a margin; the others name that worker, the worker its own link."""
    res = run_job("dist_sync", link_down=side, timeout=60)
    assert res.link_down_at is not None, f"the workers never reached round 3\n{res.dump()}"
    iso = next(w for w in res.workers if w.host == res.isolated)
    [start] = iso.events("start") or [None]
    assert start is not None, res.dump()
    culprit = f"worker {start['rank']}"
    for p in res.procs:
        assert p.ended is not None, f"{p.name} still ran {res.dump()}"
        assert p.popen.returncode not in (0, None), f"{p.name} exited 0 after the link went down\n{res.dump()}"
        took = p.ended - res.link_down_at
        assert took <= HB_TIMEOUT + LINK_MARGIN, f"{p.name} took {took:.1f} s to stop\n{res.dump()}"
        if p is iso:
            # e.g. address.describe_link's "this host's link eth0 (10.213.0.5) is down"
            said = rf"\beth0 \({re.escape(res.ips[iso.host])}\) is down"
            assert re.search(said, p.out), f"{p.name} does not say its link is down ({said})\n{res.dump()}"
            assert not re.search(r"scheduler\b[^\n]*\bstopped", p.out), f"{p.name} blames the scheduler\n{res.dump()}"
        else:
            assert culprit in p.out, f"{p.name} does not name {culprit!r}\n{res.dump()}"


# -- a server that announces loopback to a scheduler on another host ------------------------------
def test_a_server_announcing_loopback_is_refused_with_the_variable_to_set():
    """The first build: servers announced tcp://127.0.1.1 and the workers timed out 120 s later.
    Now the scheduler refuses the registration and the server exits at once saying what to set."""
    with Hosts(2, hostnames=True) as hosts:
        env = {"DMLC_PS_ROOT_URI": hosts[0].ip, "DMLC_PS_ROOT_PORT": str(PORT), "DMLC_NUM_SERVER": "1",
               "DMLC_NUM_WORKER": "1", "KVFRAME_CONNECT_TIMEOUT": "20", "KVFRAME_SECRET": "s"}
        sched = hosts.popen(0, [sys.executable, "-m", "kvframe_dist", "--role", "scheduler"],
                            {**env, "DMLC_ROLE": "scheduler"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
        t0 = time.monotonic()
        server = hosts.run(1, [sys.executable, "-m", "kvframe_dist", "--role", "server"],
                           {**env, "DMLC_ROLE": "server", "DMLC_NODE_HOST": "127.0.0.1"}, timeout=30)
        took = time.monotonic() - t0
        sched.kill()
        out = server.stdout + server.stderr
        assert server.returncode != 0 and took < 15, (took, out)
        assert "loopback address tcp://127.0.0.1:" in out and "DMLC_INTERFACE" in out, out
