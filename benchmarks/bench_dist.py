"""dist_sync side by side with Apache MXNet 1.9.1's ps-lite store: on loopback, or on simulated hosts
with shaped links (``--hosts``), or with packet loss on one worker's link (``--loss``).

Every job: 2 workers, 1 or 2 servers; each round every worker pushes and pulls (i) one key of 2^22
float32, (ii) 100 keys of 1024 float32.  Each worker warms up, then times ``trials`` runs of
``reps`` rounds; a figure is the best trial of rank 0 (``--loss``: the mean over every timed
round, as losses are rare events).  kvframe runs once per transport plugin (``KVFRAME_TRANSPORT``);
MXNet with the same worker loop (as ../shared/anchors/mx_dist_bench.py, plus trials; like the
anchor it waits for its engine once per trial, so a key's next round may start before the other keys'
pulls are done; ``--mx-round-sync`` waits every round, as a training step's forward pass must).

* loopback (default): kvframe through ``kvframe-launch`` with transports tcp, shm, zmq; MXNet as
  ../shared/anchors/mx_dist_launch.sh starts it (DMLC_INTERFACE=lo).  Server updates: none (the
  servers assign the sum) and 'test' (weight += summed gradient; MXNet's ``mx.optimizer.Test``).
  The old README table (shm vs --no-shm) is printed alongside.
* ``--hosts``: simulated hosts (tests/dist/netns.py, needs root): the scheduler on host 0, each
  server and each worker on a host of its own, every link shaped with tc tbf (1 and 10 Gbit/s,
  both directions: a full-duplex NIC; ``--egress-only``: what each host sends).  Every process
  gets MXNet's variables only (DMLC_ROLE, DMLC_PS_ROOT_URI/PORT, DMLC_NUM_*, DMLC_INTERFACE=eth0).
  Printed against the link floor: the bytes of the busiest shaped link direction per round / rate.
  The shm transport is checked once to fall back to tcp across hosts.
* ``--loss [PCT]``: the hosts, unshaped, with PCT % (default 5) random packet loss on both
  directions of one worker's link (a classic-BPF tc filter: this kernel may lack netem), 100 keys x
  1024 floats; slowdown of each system against its own run without loss, the time loss adds per
  round, and the TCP counters of every host (retransmits, RTOs, tail-loss probes) per round.
  ``--rto-min MS`` lowers every connection's minimum RTO (route ``rto_min``) to show what Linux's
  200 ms floor costs; ``--loss-gso`` drops GSO skbs (up to 64 KiB) as netem on a veth would.

Usage: python benchmarks/bench_dist.py [--quick] [--no-mxnet] [--tries N] [--trials N]
           [--transports tcp,shm,zmq] [--servers 1,2] [--workloads big,small] [--opt none,test]
           [--hosts [--rates 1gbit,10gbit] [--egress-only] [--no-shm-check]]
           [--loss [PCT] [--loss-gso] [--rto-min MS]] [--auth secret|insecure|both] [--mac-data]
           [--mx-round-sync] [--json FILE]

kvframe off loopback needs a job secret (or KVFRAME_INSECURE=1): ``--auth`` picks; the default gives
each job a random KVFRAME_SECRET, as a real deployment would, so every message carries a MAC
(``--mac-data``: over the data bytes too, KVFRAME_MAC_DATA=1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import table  # noqa: E402

if "KVFRAME_MXNET_VENV" not in os.environ and not common.MXNET_VENV.exists() and \
        (common.REPO / ".venv-mxnet" / "bin" / "python").exists():
    common.MXNET_VENV = common.REPO / ".venv-mxnet"  # the anchors' setup script's default, run in the repo


def mxnet_python():
    return common.mxnet_python()


WORKER = r"""
import json, os, time
import numpy as np
import kvframe
kv = kvframe.create(os.environ.get("KVTYPE", "dist_sync"))
size = int(os.environ["SIZE"]); nkeys = int(os.environ["NKEYS"]); reps = int(os.environ["REPS"])
trials = int(os.environ["TRIALS"]); warmup = int(os.environ.get("WARMUP", "2")); opt = os.environ.get("OPT", "none")
if opt == "test":
    kv.set_optimizer("test", rescale_grad=1.0)
keys = list(range(nkeys))
kv.init(keys, [np.zeros(size, np.float32)] * nkeys)
vals = [np.ones(size, np.float32) for _ in keys]; outs = [np.zeros(size, np.float32) for _ in keys]
for _ in range(warmup):
    kv.push(keys, vals); kv.pull(keys, out=outs)
kv.barrier()
ms = []; t0 = time.time(); c0 = time.process_time()
for _ in range(trials):
    t = time.perf_counter()
    for _ in range(reps):
        kv.push(keys, vals); kv.pull(keys, out=outs)
    ms.append((time.perf_counter() - t) / reps * 1e3)
t1 = time.time(); cpu = time.process_time() - c0
ok = opt != "none" or all(float(o[0]) == kv.num_workers and float(o[-1]) == kv.num_workers for o in outs)
info = kv.backend.transport_info() if hasattr(kv.backend, "transport_info") else {}
print("BENCH " + json.dumps({"rank": kv.rank, "ms": ms, "t0": t0, "t1": t1, "cpu": cpu, "ok": ok, "info": info}),
      flush=True)
kv.close()
"""

MX_WORKER = r"""
import json, os, time
import mxnet as mx
kv = mx.kv.create(os.environ.get("KVTYPE", "dist_sync"))
size = int(os.environ["SIZE"]); nkeys = int(os.environ["NKEYS"]); reps = int(os.environ["REPS"])
trials = int(os.environ["TRIALS"]); warmup = int(os.environ.get("WARMUP", "2")); opt = os.environ.get("OPT", "none")
if opt == "test":
    kv.set_optimizer(mx.optimizer.Test(rescale_grad=1.0))
keys = list(range(nkeys))
kv.init(keys, [mx.nd.zeros((size,))] * nkeys)
vals = [mx.nd.ones((size,)) for _ in keys]; outs = [mx.nd.zeros((size,)) for _ in keys]
for _ in range(warmup):
    kv.push(keys, vals); kv.pull(keys, out=outs)
mx.nd.waitall()
kv._barrier()
# MX_ROUND_SYNC=1: wait for every pull each round, as a training step's forward pass would (else MXNet's
# engine lets a key's next round start before the other keys' pulls are done, as in the anchor)
round_sync = os.environ.get("MX_ROUND_SYNC") == "1"
ms = []; t0 = time.time(); c0 = time.process_time()
for _ in range(trials):
    t = time.perf_counter()
    for _ in range(reps):
        kv.push(keys, vals); kv.pull(keys, out=outs)
        if round_sync:
            mx.nd.waitall()
    mx.nd.waitall()
    ms.append((time.perf_counter() - t) / reps * 1e3)
t1 = time.time(); cpu = time.process_time() - c0
# (no exact check: with one device MXNet 1.9.1's push buffer aliases its pull buffer, the sums compound)
ok = all(float(o[0].asscalar()) > 0 for o in outs)
print("BENCH " + json.dumps({"rank": kv.rank, "ms": ms, "t0": t0, "t1": t1, "cpu": cpu, "ok": ok, "info": {}}),
      flush=True)
"""

RE_BENCH = re.compile(r"BENCH (\{.*\})")
STRIP = ("DMLC_", "KVFRAME_", "MXNET_", "PS_")
CLK_TCK = os.sysconf("SC_CLK_TCK")

WORKLOADS = {"big": ("1 key x 2^22 float32", 1 << 22, 1), "small": ("100 keys x 1024 float32", 1024, 100)}

# backends/dist/README.md before the transports became plugins (kvframe-launch default = shared memory,
# --no-shm = zmq/TCP only): (workload, servers, optimizer) -> (MXNet, kvframe, kvframe sockets only)
README_BEFORE = {
    ("big", 1, "none"): (26.5, 4.13, 20.95), ("big", 2, "none"): (21.0, 5.24, 18.45),
    ("big", 1, "test"): (28.8, 6.73, 21.50), ("big", 2, "test"): (24.2, 7.46, 18.95),
    ("small", 1, "none"): (6.7, 1.23, 2.49), ("small", 2, "none"): (8.1, 1.41, 1.77),
    ("small", 1, "test"): (74.5, 2.34, 3.71), ("small", 2, "test"): (51.0, 2.38, 3.26),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(x: float | None, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if x is not None else "-"


def _ratio(mx: float | None, kv: float | None) -> str:
    return f"{mx / kv:.2f}x" if mx and kv else "-"


def _pct(floor_ms: float, ms: float | None) -> str:
    return f"{100 * floor_ms / ms:.0f} %" if ms else "-"


def installed_transports() -> list[str]:
    from kvframe import plugins

    plugins.load_all()
    return sorted(plugins.names("transports"))


# -- jobs ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    system: str  # "kvframe" or "mxnet"
    transport: str | None  # kvframe's KVFRAME_TRANSPORT
    workload: str  # a WORKLOADS key
    servers: int
    reps: int
    trials: int
    opt: str = "none"
    warmup: int = 2
    workers: int = 2
    secure: bool = True  # kvframe off loopback: KVFRAME_SECRET (else KVFRAME_INSECURE=1)
    mac_data: bool = False  # with a secret: KVFRAME_MAC_DATA=1 (the MAC covers the data bytes too)
    mx_round_sync: bool = False  # MXNet waits for every pull each round (MX_ROUND_SYNC=1)

    @property
    def label(self) -> str:
        who = f"kvframe {self.transport}" if self.system == "kvframe" else "MXNet"
        return f"{who}, {WORKLOADS[self.workload][0]}, {self.servers} server(s), update {self.opt}"

    def env(self) -> dict[str, str]:
        _, size, nkeys = WORKLOADS[self.workload]
        return {"SIZE": str(size), "NKEYS": str(nkeys), "REPS": str(self.reps), "TRIALS": str(self.trials),
                "WARMUP": str(self.warmup), "OPT": self.opt, "KVTYPE": "dist_sync", "PYTHONUNBUFFERED": "1"}


@dataclass
class Result:
    records: list[dict] = field(default_factory=list)  # the workers' BENCH lines
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds per second in the timed window
    error: str | None = None
    wall: float = 0.0

    @property
    def rank0(self) -> dict | None:
        return next((r for r in self.records if r.get("rank") == 0), self.records[0] if self.records else None)

    def best(self) -> float | None:
        r = self.rank0
        return min(r["ms"]) if r else None

    def mean(self) -> float | None:
        r = self.rank0
        return statistics.fmean(r["ms"]) if r else None


def _scripts(folder: Path) -> tuple[Path, Path]:
    kv, mx = folder / "kv_dist_worker.py", folder / "mx_dist_worker.py"
    kv.write_text(WORKER)
    mx.write_text(MX_WORKER)
    return kv, mx


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (every thread)
    except (OSError, IndexError, ValueError):
        return None


def _machine_cpu() -> tuple[float, float] | None:
    """(busy, softirq) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK, v[6] / CLK_TCK


def _window_cpu(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    """CPU seconds per second between t0 and t1 from (time, cpu seconds) samples."""
    before = [s for s in samples if s[0] <= t0]
    after = [s for s in samples if s[0] >= t1]
    if not before or not after or after[0][0] <= before[-1][0]:
        return None
    (ta, ca), (tb, cb) = before[-1], after[0]
    return (cb - ca) / (tb - ta)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Local:
    """Every role on this machine, on loopback (MXNet as anchors/mx_dist_launch.sh starts it)."""

    interface = "lo"

    def ip(self, i: int) -> str:
        return "127.0.0.1"

    def popen(self, i: int, argv: list[str], env: dict, **kw) -> subprocess.Popen:
        base = {k: v for k, v in os.environ.items() if not k.startswith(STRIP)}
        return subprocess.Popen(argv, env={**base, **env}, start_new_session=True, stdin=subprocess.DEVNULL, **kw)


class OnHosts:
    """Scheduler on host 0, servers on hosts 1..S, workers on the hosts after the servers'."""

    interface = "eth0"

    def __init__(self, bed, max_servers: int):
        self.bed, self.max_servers = bed, max_servers

    def ip(self, i: int) -> str:
        return self.bed.hosts[i].ip

    def popen(self, i: int, argv: list[str], env: dict, **kw) -> subprocess.Popen:
        return self.bed.hosts.popen(i, argv, env, cwd=str(HERE.parent), **kw)


def run_job(place, job: Job, scripts: tuple[Path, Path], port: int, timeout: float = 400) -> Result:
    """One job: scheduler, servers and workers started through ``place``; waits for the workers."""
    kv_script, mx_script = scripts
    res = Result()
    if job.system == "mxnet":
        py = mxnet_python()
        if py is None:
            res.error = "no MXNet venv"
            return res
        # the MXNet venv first on PATH, no PYTHONPATH (as the anchor script is run)
        node = ["env", "-u", "PYTHONPATH", f"PATH={py.parent}{os.pathsep}{os.environ.get('PATH', '')}", str(py)]
        sched_argv = server_argv = [*node, "-c", "import mxnet"]
        worker_argv = [*node, str(mx_script)]
        extra = {"PS_VERBOSE": "0", "MX_ROUND_SYNC": "1" if job.mx_round_sync else "0"}
    else:
        sched_argv = [sys.executable, "-m", "kvframe_dist", "--role", "scheduler"]
        server_argv = [sys.executable, "-m", "kvframe_dist", "--role", "server"]
        worker_argv = [sys.executable, str(kv_script)]
        extra = {"KVFRAME_TRANSPORT": job.transport or "tcp"}
        if job.secure:  # a job off loopback: authenticated sessions (an HMAC-SHA256 on every message)
            extra["KVFRAME_SECRET"] = secrets.token_hex(16)
            if job.mac_data:
                extra["KVFRAME_MAC_DATA"] = "1"
        else:
            extra["KVFRAME_INSECURE"] = "1"
    max_servers = getattr(place, "max_servers", job.servers)
    common = {"DMLC_PS_ROOT_URI": place.ip(0), "DMLC_PS_ROOT_PORT": str(port), "DMLC_NUM_SERVER": str(job.servers),
              "DMLC_NUM_WORKER": str(job.workers), "DMLC_INTERFACE": place.interface, **extra, **job.env()}
    plan = [("scheduler", 0, sched_argv)] + [("server", 1 + s, server_argv) for s in range(job.servers)]
    plan += [("worker", 1 + max_servers + w, worker_argv) for w in range(job.workers)]
    procs = []
    with tempfile.TemporaryDirectory(prefix="kvf-bench-") as d:
        t_start = time.monotonic()
        try:
            for n, (role, host, argv) in enumerate(plan):
                out = open(Path(d) / f"{n}-{role}.log", "w+")  # noqa: SIM115 - closed below
                procs.append((role, out, place.popen(host, argv, {**common, "DMLC_ROLE": role}, stdout=out,
                                                     stderr=subprocess.STDOUT)))
            samples: dict[int | str, list[tuple[float, float]]] = {}
            deadline = t_start + timeout
            while time.monotonic() < deadline:
                m = _machine_cpu()
                if m is not None:
                    samples.setdefault("machine", []).append((time.time(), m[0]))
                    samples.setdefault("softirq", []).append((time.time(), m[1]))
                for n, (role, _, p) in enumerate(procs):
                    if role != "worker" and p.poll() is None:
                        c = _cpu_seconds(p.pid)
                        if c is not None:
                            samples.setdefault(n, []).append((time.time(), c))
                workers = [p for role, _, p in procs if role == "worker"]
                if all(p.poll() is not None for p in workers):
                    break
                if any(p.poll() not in (None, 0) for _, _, p in procs):
                    time.sleep(1)  # let the others report why
                    break
                time.sleep(0.1)
            else:
                res.error = f"ran past {timeout:.0f} s"
            grace = time.monotonic() + 10
            for _, _, p in procs:
                try:
                    p.wait(max(0.1, grace - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for _, out, p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait(5)
                out.flush()
        res.wall = time.monotonic() - t_start
        texts = []
        for role, out, p in procs:
            out.seek(0)
            text = out.read()
            out.close()
            texts.append(f"--- {role} (exit {p.returncode})\n{text[-3000:]}")
            if role == "worker":
                res.records += [json.loads(m.group(1)) for m in RE_BENCH.finditer(text)]
        if res.records:
            r0 = res.rank0
            for n, s in samples.items():
                c = _window_cpu(s, r0["t0"], r0["t1"])
                if c is not None:
                    role = n if isinstance(n, str) else plan[n][0] + (f" {plan[n][1] - 1}" if plan[n][0] == "server"
                                                                      else "")
                    res.cpu[role] = c
            res.cpu["worker 0"] = r0["cpu"] / max(1e-9, r0["t1"] - r0["t0"])
            if not all(r.get("ok", True) for r in res.records):
                res.error = "wrong sums in the pulled values"
        if len(res.records) < job.workers and res.error is None:
            res.error = "a worker printed no result"
        if res.error:
            log(f"  {job.label}: {res.error}\n" + "\n".join(texts))
    return res


def run_launch(job: Job, kv_script: Path) -> Result:
    """kvframe on loopback through kvframe-launch (the transport named by KVFRAME_TRANSPORT)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIP)}
    env.update(job.env(), KVFRAME_TRANSPORT=job.transport or "tcp")
    res = Result()
    t = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "kvframe_launch", "-n", str(job.workers), "-s",
                            str(job.servers), "--", sys.executable, str(kv_script)], capture_output=True, text=True,
                           env=env, timeout=400)
    except subprocess.TimeoutExpired:
        res.error = "ran past 400 s"
        return res
    res.wall = time.monotonic() - t
    res.records = [json.loads(m.group(1)) for m in RE_BENCH.finditer(p.stdout)]
    if p.returncode or len(res.records) < job.workers or not all(r.get("ok", True) for r in res.records):
        res.error = f"exit {p.returncode}, {len(res.records)} results"
        log(f"  {job.label}: {res.error}\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    if res.records:
        r0 = res.rank0
        res.cpu["worker 0"] = r0["cpu"] / max(1e-9, r0["t1"] - r0["t0"])
    return res


def best_of(results: list[Result]) -> Result:
    good = [r for r in results if r.best() is not None and r.error is None]
    return min(good, key=lambda r: r.best()) if good else (results[0] if results else Result(error="not run"))


def _cpu_text(res: Result) -> str:
    """'w0 0.31, s0 0.52, all 1.90 (si 0.40)': worker 0, each server, the whole machine (its softirq part)."""
    c = res.cpu
    parts = [f"w0 {c['worker 0']:.2f}"] if "worker 0" in c else []
    parts += [f"s{k.split()[1]} {v:.2f}" for k, v in sorted(c.items()) if k.startswith("server ")]
    if "machine" in c:
        parts.append(f"all {c['machine']:.2f}" + (f" (si {c['softirq']:.2f})" if "softirq" in c else ""))
    return ", ".join(parts) or "-"


# -- loopback --------------------------------------------------------------------------------------------

def loopback(args, scripts, transports: list[str], missing: dict[str, str]) -> str:
    rows, raw = [], []
    for wl in args.workloads:
        reps = {"big": 5 if args.quick else 10, "small": 20 if args.quick else 50}[wl]
        for opt in args.opt:
            for servers in args.servers:
                figures: dict[str, float | None] = {}
                cpus = {}
                for t in transports:
                    job = Job("kvframe", t, wl, servers, reps, args.trials, opt)
                    res = best_of([run_launch(job, scripts[0]) for _ in range(args.tries)])
                    figures[t], cpus[t] = res.best(), _cpu_text(res)
                    log(f"  {job.label}: {_fmt(figures[t])} ms/round (worker CPU {cpus[t]}, {res.wall:.0f} s)")
                mx = None
                if not args.no_mxnet:
                    job = Job("mxnet", None, wl, servers, max(5, reps // 2), args.trials, opt,
                              mx_round_sync=args.mx_round_sync)
                    res = best_of([run_job(Local(), job, scripts, _free_port()) for _ in range(args.tries)])
                    mx = res.best()
                    log(f"  {job.label}: {_fmt(mx)} ms/round ({res.wall:.0f} s)")
                before = README_BEFORE.get((wl, servers, opt), (None, None, None))
                rows.append([WORKLOADS[wl][0], servers, opt, _fmt(mx),
                             *(_fmt(figures[t]) if t not in missing else "n/a" for t in transports),
                             *(_ratio(mx, figures[t]) for t in transports),
                             f"{_fmt(before[1])} / {_fmt(before[2])}"])
                raw.append({"workload": wl, "servers": servers, "opt": opt, "mxnet": mx, "kvframe": figures})
    head = ["workload", "servers", "server update", "MXNet ms/round", *(f"kvframe {t} ms/round" for t in transports),
            *(f"ratio {t}" for t in transports), "README before: shm / sockets ms"]
    text = ("## dist_sync on loopback, 2 workers, push+pull per round (best of "
            f"{args.trials} trials x {args.tries} job(s); ratio = MXNet / kvframe)\n\n"
            "kvframe through kvframe-launch (a fresh job secret: a MAC on every message's header); README "
            "before: the old table, measured with kvframe's former built-in shared-memory path\n\n"
            + table(head, rows))
    if missing:
        text += "\n\n" + "; ".join(f"{t}: {why}" for t, why in missing.items())
    args.raw["loopback"] = raw
    return text


# -- simulated hosts -------------------------------------------------------------------------------------

def _hosts_reps(wl: str, floor2: float, quick: bool) -> int:
    if wl == "small":
        return 10 if quick else 25
    return max(2, min(20, math.ceil((0.6 if quick else 1.2) / floor2)))


def hosts_mode(args, scripts, transports: list[str], missing: dict[str, str]) -> str:
    from benchmarks.netbench_hosts import Testbed, fmt_rate, link_floor, rate_bps

    max_servers = max(args.servers)
    sections, raw, port = [], [], 9100
    with Testbed(1 + max_servers + 2) as bed:
        place = OnHosts(bed, max_servers)
        for rate in args.rates:
            bps = rate_bps(rate)
            for i in range(len(bed.hosts)):
                bed.shape(i, bps, egress_only=args.egress_only)
            rows, formulas = [], []
            for wl, opt, servers in [(w, o, s) for w in args.workloads for o in args.opt for s in args.servers]:
                _, size, nkeys = WORKLOADS[wl]
                name = WORKLOADS[wl][0] + (f", update {opt}" if len(args.opt) > 1 else "")
                fl = link_floor(size, nkeys, servers, 2, bps, egress_only=args.egress_only)
                if opt == args.opt[0]:
                    formulas.append(f"- {WORKLOADS[wl][0]}, {servers} server(s): {fl.formula} = "
                                    f"{fl.seconds * 1e3:.1f} ms (push-then-pull time, both workers' pushes "
                                    f"then all replies with no overlap: {fl.two_phase * 1e3:.1f} ms)")
                reps = _hosts_reps(wl, fl.two_phase, args.quick)
                mx_res = None
                if not args.no_mxnet:
                    port += 1
                    job = Job("mxnet", None, wl, servers, reps, args.trials, opt, mx_round_sync=args.mx_round_sync)
                    mx_res = best_of([run_job(place, job, scripts, port) for _ in range(args.tries)])
                    log(f"  {fmt_rate(bps)}, {job.label}: {_fmt(mx_res.best())} ms/round, CPU "
                        f"{_cpu_text(mx_res)} ({mx_res.wall:.0f} s)")
                mx = mx_res.best() if mx_res else None
                for t, secure in _variants(args, transports, missing):
                    port += 1
                    job = Job("kvframe", t, wl, servers, reps, args.trials, opt, secure=secure, mac_data=args.mac_data)
                    res = best_of([run_job(place, job, scripts, port) for _ in range(args.tries)])
                    ms = res.best()
                    log(f"  {fmt_rate(bps)}, {job.label}: {_fmt(ms)} ms/round, CPU {_cpu_text(res)} "
                        f"({res.wall:.0f} s)")
                    target, met = _target(wl, bps, fl.seconds * 1e3, ms, mx)
                    rows.append([name, servers, _vname(args, t, secure), _fmt(ms), f"{fl.seconds * 1e3:.1f}",
                                 _pct(fl.seconds * 1e3, ms), _pct(fl.two_phase * 1e3, ms), _fmt(mx),
                                 _pct(fl.seconds * 1e3, mx), _ratio(mx, ms), target, met, _cpu_text(res),
                                 _cpu_text(mx_res) if mx_res else "-"])
                    raw.append({"rate": rate, "workload": wl, "opt": opt, "servers": servers, "transport": t,
                                "secure": secure, "ms": ms,
                                "mxnet": mx, "floor_ms": fl.seconds * 1e3, "two_phase_ms": fl.two_phase * 1e3,
                                "cpu": res.cpu, "mx_cpu": mx_res.cpu if mx_res else None,
                                "trials": res.rank0["ms"] if res.rank0 else None})
            head = ["workload", "servers", "kvframe transport", "kvframe ms/round", "floor ms", "% of floor",
                    "% of push-then-pull", "MXNet ms/round", "MXNet % of floor", "ratio", "target", "met",
                    "kvframe CPU (cores)", "MXNet CPU (cores)"]
            shaped = "egress of each host's eth0" if args.egress_only else "both directions of each host's link"
            sections.append(
                f"## dist_sync on simulated hosts, links {fmt_rate(bps)} (tc tbf on {shaped}), 2 workers\n\n"
                f"{_auth(args)}. "
                f"Link floor = bytes of the busiest shaped link direction per round / rate (directions are "
                f"independent: full duplex; payload only, TCP/IP headers add ~4.5 % on the wire):\n"
                + "\n".join(formulas) + "\n\n" + table(head, rows))
        if "shm" not in transports and "shm" not in missing and args.shm_check:
            sections.append(_shm_check(bed, place, args, scripts))
    args.raw["hosts"] = raw
    note = (f"ms/round: best of {args.trials} trials in one job; ratio = MXNet / kvframe; CPU: CPU seconds per "
            f"second during the timed rounds of worker 0 (w0), each server (s0, s1) and the whole machine (all, "
            f"other users included; si: its softirq part, the network stack), {os.cpu_count()} cores")
    if missing:
        note += "\n" + "; ".join(f"{t}: {why}" for t, why in missing.items())
    return "\n\n".join(sections) + "\n\n" + note


def _variants(args, transports: list[str], missing: dict[str, str]) -> list[tuple[str, bool]]:
    """(transport, with a job secret) for every kvframe run."""
    auths = {"secret": [True], "insecure": [False], "both": [True, False]}[args.auth]
    return [(t, secure) for t in transports if t not in missing for secure in auths]


def _vname(args, t: str, secure: bool) -> str:
    return t if args.auth != "both" or secure else f"{t} insecure"


def _auth(args) -> str:
    secret = ("a KVFRAME_SECRET per job (every message carries an HMAC-SHA256 over its sequence number, header "
              "and frame lengths" + (", and its data bytes: KVFRAME_MAC_DATA=1)" if args.mac_data else
                                     "; not the data bytes: no KVFRAME_MAC_DATA)"))
    return {"secret": f"kvframe with {secret}", "insecure": "kvframe with KVFRAME_INSECURE=1 (no MACs)",
            "both": f"kvframe with {secret}, and ('insecure') with KVFRAME_INSECURE=1 (no MACs)"}[args.auth] + \
        "; MXNet authenticates nothing"


def _target(wl: str, bps: int, floor_ms: float, ms: float | None, mx: float | None) -> tuple[str, str]:
    if ms is None:
        return "-", "-"
    if wl == "small":
        return ">= 8x MXNet", ("yes" if mx and mx / ms >= 8 else "no") if mx else "-"
    if bps <= 1e9:
        return ">= 90 % of floor", "yes" if floor_ms / ms >= 0.9 else "no"
    return ">= 1.5x MXNet", ("yes" if mx / ms >= 1.5 else "no") if mx else "-"


def _shm_check(bed, place, args, scripts) -> str:
    """kvframe with transport shm across hosts: it must fall back to tcp (no shared-memory peer)."""
    servers = min(args.servers)
    job = Job("kvframe", "shm", "big", servers, 3, 2, secure=args.auth != "insecure", mac_data=args.mac_data)
    for i in range(len(bed.hosts)):
        bed.hosts.shm_created(i)  # reset the record
    res = run_job(place, job, scripts, 9099)
    lines = []
    for r in res.records:
        peers = r.get("info", {}).get("shared_memory_peers")
        lines.append(f"worker {r['rank']}: transport {r.get('info', {}).get('transport')}, shared-memory peers "
                     f"{peers}")
    workers = [1 + place.max_servers + w for w in range(2)]
    made = {w: bed.hosts.shm_created(w) for w in workers}
    left = {w: bed.hosts.shm_files(w) for w in workers}
    fell_back = bool(res.records) and all(not r.get("info", {}).get("shared_memory_peers") for r in res.records)
    return ("## transport shm across hosts (the last link rate, 1 key x 2^22, "
            f"{servers} server(s))\n\n"
            f"{'falls back to tcp' if fell_back else 'DID NOT fall back'}: " + "; ".join(lines) +
            f"; {_fmt(res.best())} ms/round; ring files created in the workers' private /dev/shm during the job: "
            f"{sum(len(v) for v in made.values())}, left after it: {sum(len(v) for v in left.values())}"
            + (f"; error: {res.error}" if res.error else ""))


# -- packet loss -----------------------------------------------------------------------------------------

def _all_counters(bed, lossy: int) -> dict[str, int]:
    """TCP counters summed over every host; OutSegsLossy: segments sent by the lossy worker's host."""
    total: dict[str, int] = {}
    for i in range(len(bed.hosts)):
        for k, v in bed.tcp_counters(i).items():
            total[k] = total.get(k, 0) + v
    total["OutSegsLossy"] = bed.tcp_counters(lossy).get("OutSegs", 0)
    return total


def loss_mode(args, scripts, transports: list[str], missing: dict[str, str]) -> str:
    from benchmarks.netbench_hosts import Testbed

    max_servers = max(args.servers)
    lossy = 1 + max_servers  # the first worker's host
    systems = ([] if args.no_mxnet else [("mxnet", None, False)]) + \
        [("kvframe", t, secure) for t, secure in _variants(args, transports, missing)]
    rows, raw, port = [], [], 9300
    reps, trials = (8, 2) if args.quick else (10, 3)
    with Testbed(1 + max_servers + 2) as bed:
        place = OnHosts(bed, max_servers)
        for i in range(len(bed.hosts)):
            if not args.loss_gso:
                bed.set_gso_segs(i, 1)
            if args.rto_min:
                bed.set_rto_min(i, args.rto_min)
        for servers in args.servers:
            for system, t, secure in systems:
                got = {}
                for lossy_run in (False, True):
                    if lossy_run:
                        bed.set_loss(lossy, args.loss / 100)
                    c0, d0 = _all_counters(bed, lossy), bed.loss_drops(lossy)
                    port += 1
                    job = Job(system, t, "small", servers, reps, trials, args.opt[0], secure=secure,
                              mac_data=args.mac_data, mx_round_sync=args.mx_round_sync)
                    res = run_job(place, job, scripts, port, timeout=600)
                    c1, d1 = _all_counters(bed, lossy), bed.loss_drops(lossy)
                    bed.clear_loss(lossy)
                    rounds = job.warmup + reps * trials
                    per = {k: (c1.get(k, 0) - c0.get(k, 0)) / rounds for k in c1}
                    got[lossy_run] = (res.mean(), per, (d1 - d0) / rounds, res)
                    log(f"  loss {args.loss if lossy_run else 0} %, {job.label}: {_fmt(res.mean())} ms/round "
                        f"(trials {res.rank0['ms'] if res.rank0 else None}); per round: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in per.items()) + f", dropped {(d1 - d0) / rounds:.1f}")
                (ms0, per0, _, _), (ms1, per1, drops, _) = got[False], got[True]
                name = "MXNet" if system == "mxnet" else f"kvframe {_vname(args, t, secure)}"
                slow = ms1 / ms0 if ms0 and ms1 else None
                rows.append([servers, name, _fmt(ms0), _fmt(ms1), f"{slow:.1f}x" if slow else "-",
                             _fmt(ms1 - ms0 if ms0 and ms1 else None, 1), f"{drops:.1f}",
                             f"{per0.get('OutSegsLossy', 0):.0f} / {per1.get('OutSegsLossy', 0):.0f}",
                             f"{per1.get('RetransSegs', 0):.1f}", f"{per1.get('TCPTimeouts', 0):.2f}",
                             f"{per1.get('TCPLossProbes', 0):.2f}", f"{per1.get('TCPFastRetrans', 0):.1f}"])
                raw.append({"servers": servers, "system": name, "ms": ms0, "ms_loss": ms1, "counters": per0,
                            "counters_loss": per1, "drops": drops})
    args.raw["loss"] = raw
    how = "one skb = one MSS-sized packet (gso_max_segs 1)" if not args.loss_gso else "GSO kept (a drop may be 64 KiB)"
    if args.rto_min:
        how += f"; every connection's minimum RTO {args.rto_min:g} ms (route rto_min), not Linux's 200 ms"
    head = ["servers", "system", "no loss ms/round", f"{args.loss:g} % loss ms/round", "slowdown",
            "added ms/round", "packets dropped", "segments sent (no loss / loss)", "retransmits", "RTOs", "loss probes",
            "fast retransmits"]
    return (f"## {args.loss:g} % packet loss on both directions of worker host {lossy}'s link (no rate limit; "
            f"{how}), 100 keys x 1024 float32, 2 workers\n\n{_auth(args)}. "
            f"ms/round: mean over {reps * trials} timed rounds in one job; the other columns are per round: "
            f"TCP counters summed over every host (only worker host {lossy}'s link loses packets; its peers "
            f"retransmit what it did not get) over the whole job / {2 + reps * trials} rounds; segments sent: by "
            f"the lossy worker's host\n\n"
            + table(head, rows))


# -- main ------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-mxnet", action="store_true")
    ap.add_argument("--tries", type=int, default=1, help="jobs per figure (the best is kept)")
    ap.add_argument("--trials", type=int, help="timed trials per job (default 3, --quick 2)")
    ap.add_argument("--transports", help="kvframe transports (loopback: tcp,shm,zmq; --hosts/--loss: tcp,zmq)")
    ap.add_argument("--servers", default="1,2")
    ap.add_argument("--workloads", default="big,small", help="big (1 key x 2^22), small (100 keys x 1024)")
    ap.add_argument("--opt", help="server updates: none,test (loopback default none,test; else none)")
    ap.add_argument("--hosts", action="store_true", help="simulated hosts with shaped links (root)")
    ap.add_argument("--rates", default="1gbit,10gbit", help="--hosts: link rates")
    ap.add_argument("--egress-only", action="store_true", help="--hosts: shape only what each host sends")
    ap.add_argument("--no-shm-check", dest="shm_check", action="store_false",
                    help="--hosts: skip the check that transport shm falls back to tcp across hosts")
    ap.add_argument("--loss", type=float, nargs="?", const=5.0, help="packet loss mode: PCT %% (default 5)")
    ap.add_argument("--loss-gso", action="store_true", help="--loss: keep GSO (a dropped skb may be 64 KiB)")
    ap.add_argument("--rto-min", type=float, help="--loss: minimum RTO in ms on every host (route rto_min)")
    ap.add_argument("--auth", choices=["secret", "insecure", "both"], default="secret",
                    help="--hosts/--loss: kvframe with a job secret (MACs, the default off loopback), with "
                    "KVFRAME_INSECURE=1, or both")
    ap.add_argument("--mac-data", action="store_true", help="with a secret: KVFRAME_MAC_DATA=1 (MACs over the data)")
    ap.add_argument("--mx-round-sync", action="store_true",
                    help="MXNet waits for all pulls every round (as a training step must; the anchor does not)")
    ap.add_argument("--json", help="also write the raw figures to this file")
    args = ap.parse_args(argv)
    args.trials = args.trials or (2 if args.quick else 3)
    args.servers = [int(s) for s in args.servers.split(",")]
    args.workloads = args.workloads.split(",")
    multi = args.hosts or args.loss is not None
    args.opt = (args.opt or ("none" if multi else "none,test")).split(",")
    args.rates = args.rates.split(",")
    args.raw = {}
    transports = (args.transports or ("tcp,zmq" if multi else "tcp,shm,zmq")).split(",")
    have = installed_transports()
    missing = {t: f"no transport plugin {t!r} installed (installed: {', '.join(have)})"
               for t in transports if t not in have}
    for why in missing.values():
        log(f"  {why}")
    if multi:
        from benchmarks.netbench_hosts import netns_unavailable

        why = netns_unavailable()
        if why:
            text = f"simulated hosts unavailable: {why}"
            print(text)
            return text
    if multi and threading.current_thread() is threading.main_thread():
        # a plain kill must still remove the namespaces and their processes (atexit runs on SystemExit)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    texts = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kvf-bench-") as d:
        scripts = _scripts(Path(d))
        if args.hosts:
            texts.append(hosts_mode(args, scripts, transports, missing))
        if args.loss is not None:
            texts.append(loss_mode(args, scripts, transports, missing))
        if not multi:
            texts.append(loopback(args, scripts, transports, missing))
    end = os.getloadavg()
    text = "\n\n".join(texts) + (f"\n\nload average (1/5/15 min) at the start {load[0]:.2f} / {load[1]:.2f} / "
                                 f"{load[2]:.2f}, at the end {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f}; "
                                 f"{os.cpu_count()} CPUs")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(args.raw, indent=1))
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
