"""PyTorch training step time: kvframe-torch against DistributedDataParallel (gloo), 2 processes.

The same models, data and steps (zero_grad, forward, cross-entropy, backward, SGD with momentum)
under:

* DDP, backend gloo (torch's CPU all-reduce), 2 ranks;
* kvframe-torch on ``dist_sync`` (2 workers, servers as given): ``DistributedOptimizer`` in each mode
  (``sum``: the servers sum, torch's SGD on the workers; ``store``: SGD on the servers,
  ``update_on_store=True``), without and with the scale-free 2bit compression
  (``kvframe_torch.Compression.twobit``).

Models: a 64-512-512-10 MLP (301k parameters) and a small CNN for 8x8 images (151k parameters);
per-worker batch 64. Every worker uses one torch thread (2 processes on a 2-core machine). A figure
is rank 0's best mean over ``--windows`` windows of ``--steps`` steps, after warm-up.

* loopback (default): kvframe through ``kvframe-launch``; DDP through two local processes.
* ``--hosts``: simulated hosts (tests/dist/netns.py: network namespaces, needs root) with every link
  shaped to ``--rate`` (default 1gbit, both directions): rank i on host i; kvframe's scheduler and
  server 0 on host 0, server 1 (``--servers 2``) on host 1; there kvframe's ``store`` mode also
  compresses pulls (``compress_pulls=True``: each pull carries the compressed change of the
  server's weights).

Usage: python benchmarks/bench_torch.py [--quick] [--models mlp,cnn] [--steps N] [--windows N]
           [--servers N] [--hosts [--rate 1gbit]] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import table  # noqa: E402

RE_BENCH = re.compile(r"BENCH (\{.*\})")
BATCH = 64  # per worker
VARIANTS = ["sum", "store", "sum+2bit", "store+2bit"]
STRIP = ("DMLC_", "KVFRAME_", "MXNET_", "PS_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK")


# models and steps (run in the workers) ------------------------------------------------------------

def make_model(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))
    raise ValueError(f"unknown model {name!r}")


def make_data(name: str, rank: int):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    shape = (BATCH, 64) if name == "mlp" else (BATCH, 1, 8, 8)
    return torch.randn(shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def time_steps(step, steps: int, windows: int, warmup: int, sync) -> tuple[list[float], list[list[float]]]:
    """ms per step of each window, and each window's [start, end] (time.time(), for the CPU samples)."""
    for _ in range(warmup):
        step()
    sync()
    out, spans = [], []
    for _ in range(windows):
        w0, t = time.time(), time.perf_counter()
        for _ in range(steps):
            step()
        out.append((time.perf_counter() - t) / steps * 1e3)
        spans.append([w0, time.time()])
    return out, spans


def kvframe_worker(args) -> int:
    import kvframe_torch
    import torch

    import kvframe

    torch.set_num_threads(1)
    opts = json.loads(args.store_options or "{}")
    store = kvframe.create("dist_sync", **opts)
    rank = store.rank
    store.set_optimizer("sgd", learning_rate=0.05, momentum=0.9)  # for the 'store' variants
    compressed = False
    for model_name in args.models.split(","):
        x, y = make_data(model_name, rank)
        for variant in args.variants.split(","):
            if variant.endswith("+2bit") and not compressed:
                store.set_gradient_compression(kvframe_torch.Compression.twobit)
                compressed = True
            model = make_model(model_name)
            opt = kvframe_torch.DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), store, model.named_parameters(),
                update_on_store=variant.startswith("store"), prefix=f"{model_name}/{variant}/")

            def step(model=model, opt=opt, x=x, y=y):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            ms, spans = time_steps(step, args.steps, args.windows, args.warmup, store.barrier)
            opt.remove_hooks()
            store.barrier()
            if rank == 0:
                nparams = sum(p.numel() for p in model.parameters())
                print("BENCH " + json.dumps({"system": "kvframe", "model": model_name, "variant": variant,
                                             "params": nparams, "ms": ms, "spans": spans,
                                             "steps": args.steps}), flush=True)
    store.close()
    return 0


def ddp_worker(args) -> int:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for model_name in args.models.split(","):
        x, y = make_data(model_name, rank)
        model = DDP(make_model(model_name))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step(model=model, opt=opt, x=x, y=y):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        ms, spans = time_steps(step, args.steps, args.windows, args.warmup, dist.barrier)
        if rank == 0:
            nparams = sum(p.numel() for p in model.parameters())
            print("BENCH " + json.dumps({"system": "ddp", "model": model_name, "variant": "gloo",
                                         "params": nparams, "ms": ms, "spans": spans, "steps": args.steps}),
                  flush=True)
    dist.destroy_process_group()
    return 0


# orchestration --------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples the CPU seconds (user + system, every thread) of every process whose environment holds
    ``token``, a few times a second, so a window's CPU time of a whole job can be read back."""

    def __init__(self, token: str):
        self.token = token.encode()
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _pids(self) -> list[int]:
        found = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/environ", "rb") as f:
                        if self.token in f.read():
                            found.append(int(d))
                except OSError:
                    pass
        return found

    def _run(self) -> None:
        pids: list[int] = []
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now >= next_scan:
                pids, next_scan = self._pids(), now + 0.5
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
                except (OSError, IndexError, ValueError):
                    continue
                self.samples.setdefault(pid, []).append((time.time(), cpu))
            self._stop.wait(0.05)

    def cpu_between(self, t0: float, t1: float) -> float | None:
        """CPU seconds every sampled process used between t0 and t1 (linear between samples)."""
        total, seen = 0.0, False
        for samples in self.samples.values():
            a, b = self._at(samples, t0), self._at(samples, t1)
            if a is not None and b is not None:
                total += b - a
                seen = True
        return total if seen else None

    @staticmethod
    def _at(samples: list[tuple[float, float]], t: float) -> float | None:
        before = [s for s in samples if s[0] <= t]
        after = [s for s in samples if s[0] >= t]
        if not after:
            return samples[-1][1] if samples and samples[-1][0] < t else None
        if not before:
            return samples[0][1] if samples[0][0] > t else None  # not started yet: counted from its start
        (ta, ca), (tb, cb) = before[-1], after[0]
        return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)


def _with_cpu(records: list[dict], sampler: CpuSampler) -> list[dict]:
    for r in records:
        cpu = [sampler.cpu_between(t0, t1) for t0, t1 in r.get("spans", [])]
        r["cpu_ms"] = [c / r["steps"] * 1e3 if c is not None else None for c in cpu]
    return records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(args, role: str, variants: str | None = None, store_options: dict | None = None) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--models", args.models,
            "--steps", str(args.steps), "--windows", str(args.windows), "--warmup", str(args.warmup)]
    if variants:
        argv += ["--variants", variants]
    if store_options:
        argv += ["--store-options", json.dumps(store_options)]
    return argv


def _clean_env(extra: dict) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(STRIP)}
    return {**base, **extra}


def _collect(procs: list, timeout: float, what: str) -> list[dict]:
    """Waits for ``procs`` [(Popen, log file)]; returns the BENCH records (all output on failure)."""
    deadline = time.monotonic() + timeout
    try:
        for p, _ in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    records, failed = [], False
    for p, out in procs:
        if p.poll() is None:
            failed = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
        elif p.returncode != 0:
            failed = True
        out.seek(0)
        text = out.read()
        out.close()
        records += [json.loads(m.group(1)) for m in RE_BENCH.finditer(text)]
        if failed:
            print(f"  {what}: a process failed or ran past {timeout:.0f} s:\n{text[-3000:]}", file=sys.stderr)
    return records


def _log() -> object:
    return tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by _collect


def _token_env(extra: dict) -> tuple[str, dict]:
    token = f"kvf-bench-{uuid.uuid4().hex}"
    return token, {**extra, "KVFRAME_BENCH_TOKEN": token}


def ddp_loopback(args) -> list[dict]:
    port = _free_port()
    token, extra = _token_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                               "OMP_NUM_THREADS": "1"})
    procs = []
    with CpuSampler(token) as sampler:
        for rank in range(2):
            out = _log()
            procs.append((subprocess.Popen(_worker_args(args, "ddp"), env=_clean_env({**extra, "RANK": str(rank)}),
                                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True), out))
        records = _collect(procs, args.timeout, "DDP (gloo) on loopback")
    return _with_cpu(records, sampler)


def kvframe_loopback(args, secret: bool) -> list[dict]:
    """With ``secret``: as kvframe-launch runs a job (a fresh secret: every message authenticated with
    HMAC-SHA256). Without: the roles started by hand with no secret, as gloo authenticates nothing."""
    token, extra = _token_env({"OMP_NUM_THREADS": "1"})
    with CpuSampler(token) as sampler:
        if secret:
            launcher = [sys.executable, "-m", "kvframe_launch", "-n", "2", "-s", str(args.servers), "--"]
            out = _log()
            p = subprocess.Popen(launcher + _worker_args(args, "kvframe", args.variants), env=_clean_env(extra),
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            records = _collect([(p, out)], args.timeout, "kvframe on loopback")
        else:
            port = _free_port()
            common = {**extra, "DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(port),
                      "DMLC_NUM_SERVER": str(args.servers), "DMLC_NUM_WORKER": "2"}
            plan = [("scheduler", [sys.executable, "-m", "kvframe_dist", "--role", "scheduler"])]
            plan += [("server", [sys.executable, "-m", "kvframe_dist", "--role", "server"])] * args.servers
            plan += [("worker", _worker_args(args, "kvframe", args.variants))] * 2
            procs = []
            for role, argv in plan:
                out = _log()
                procs.append((subprocess.Popen(argv, env=_clean_env({**common, "DMLC_ROLE": role}), stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True), out))
            records = _collect(procs, args.timeout, "kvframe on loopback, no secret")
            for r in records:
                r["system"] = "kvframe-noauth"
    return _with_cpu(records, sampler)


def run_loopback(args) -> list[dict]:
    """``--rounds`` rounds, each one job per system in turn, so that a change of the machine's load
    between jobs does not favour one system."""
    records = []
    for _ in range(args.rounds):
        records += ddp_loopback(args)
        if args.auth in ("on", "both"):
            records += kvframe_loopback(args, secret=True)
        if args.auth in ("off", "both"):
            records += kvframe_loopback(args, secret=False)
    return records


def run_hosts(args) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from netns import Hosts, netns_unavailable

    reason = netns_unavailable()
    if reason:
        print(f"  simulated hosts unavailable: {reason}", file=sys.stderr)
        return []
    records = []
    with Hosts(2) as hosts:
        for i in range(2):
            hosts.shape(i, args.rate)
        ip0 = hosts[0].ip
        for _ in range(args.rounds):
            # DDP: rank i on host i
            port = 29500 + secrets.randbelow(1000)
            token, extra = _token_env({"MASTER_ADDR": ip0, "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                                       "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"})
            with CpuSampler(token) as sampler:
                procs = []
                for rank in range(2):
                    out = _log()
                    procs.append((hosts.popen(rank, _worker_args(args, "ddp"), {**extra, "RANK": str(rank)},
                                              cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT), out))
                records += _with_cpu(_collect(procs, args.timeout, f"DDP (gloo), {args.rate}"), sampler)
            # kvframe: scheduler and server 0 on host 0, server 1 on host 1, worker i on host i; keys of
            # 64k elements or more split over both servers. The 'store' variants compress pulls too (each
            # pull carries the compressed change of the server's weights, which is small per step).
            jobs = [("sum,sum+2bit", {"bigarray_bound": 1 << 16}),
                    ("store,store+2bit", {"bigarray_bound": 1 << 16, "compress_pulls": True})]
            for variants, options in jobs:
                variants = ",".join(v for v in variants.split(",") if v in args.variants.split(","))
                if not variants:
                    continue
                port = 9100 + secrets.randbelow(1000)
                token, extra = _token_env({"DMLC_PS_ROOT_URI": ip0, "DMLC_PS_ROOT_PORT": str(port),
                                           "DMLC_NUM_SERVER": str(args.servers), "DMLC_NUM_WORKER": "2",
                                           "DMLC_INTERFACE": "eth0", "KVFRAME_SECRET": secrets.token_hex(16),
                                           "OMP_NUM_THREADS": "1"})
                plan = [("scheduler", 0, [sys.executable, "-m", "kvframe_dist", "--role", "scheduler"])]
                plan += [("server", s % 2, [sys.executable, "-m", "kvframe_dist", "--role", "server"])
                         for s in range(args.servers)]
                plan += [("worker", w, _worker_args(args, "kvframe", variants, options)) for w in range(2)]
                with CpuSampler(token) as sampler:
                    procs = []
                    for role, host, argv in plan:
                        out = _log()
                        procs.append((hosts.popen(host, argv, {**extra, "DMLC_ROLE": role}, cwd=str(REPO),
                                                  stdout=out, stderr=subprocess.STDOUT), out))
                    records += _with_cpu(_collect(procs, args.timeout, f"kvframe {variants}, {args.rate}"), sampler)
    return records


# report -----------------------------------------------------------------------------------------------

def _best(records: list[dict], system: str, model: str, variant: str | None) -> tuple | None:
    """(ms, cpu ms, params) of the fastest window over every job of this system, model and variant."""
    best = None
    for r in records:
        if r["system"] == system and r["model"] == model and (variant is None or r["variant"] == variant):
            for ms, cpu in zip(r["ms"], r.get("cpu_ms") or [None] * len(r["ms"])):
                if best is None or ms < best[0]:
                    best = (ms, cpu, r["params"])
    return best


def report(records: list[dict], title: str, args) -> str:
    rows = []
    fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    for model in args.models.split(","):
        ddp = _best(records, "ddp", model, None)
        rows.append([model, f"{ddp[2]:,}" if ddp else "-", "DDP (gloo)", fmt(ddp and ddp[0]),
                     fmt(ddp and ddp[1]), "1.00" if ddp else "-", "1.00" if ddp and ddp[1] else "-"])
        for system, label in (("kvframe", "kvframe"), ("kvframe-noauth", "kvframe, no secret")):
            if not any(r["system"] == system for r in records):
                continue
            for variant in args.variants.split(","):
                kv = _best(records, system, model, variant)
                ratio = fmt(kv[0] / ddp[0]) if kv and ddp else "-"
                cpu_ratio = fmt(kv[1] / ddp[1]) if kv and ddp and kv[1] and ddp[1] else "-"
                rows.append([model, f"{kv[2]:,}" if kv else "-", f"{label} {variant}", fmt(kv and kv[0]),
                             fmt(kv and kv[1]), ratio, cpu_ratio])
    head = ["model", "parameters", "system", "ms/step", "CPU ms/step (all processes)", "time / DDP's",
            "CPU / DDP's"]
    return f"## {title}\n\n" + table(head, rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["kvframe", "ddp"], help=argparse.SUPPRESS)
    ap.add_argument("--store-options", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=100, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=5, help="timed windows (the best counts)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--servers", type=int, default=1, help="kvframe servers (default 1; --hosts: 2)")
    ap.add_argument("--auth", choices=["on", "off", "both"], default="both",
                    help="loopback: kvframe as kvframe-launch runs it (a job secret: every message authenticated "
                         "with HMAC-SHA256), without a secret (as gloo), or both (default)")
    ap.add_argument("--hosts", action="store_true", help="simulated hosts with shaped links (needs root)")
    ap.add_argument("--rate", default="1gbit", help="--hosts: link rate, both directions")
    ap.add_argument("--rounds", type=int, default=2, help="loopback: rounds of one job per system (the best counts)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--json", help="write the raw records here")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.windows, args.warmup, args.rounds = 30, 2, 5, 1
    if args.hosts and "--servers" not in argv:
        args.servers = 2
    return args


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker == "kvframe":
        sys.exit(kvframe_worker(args))
    if args.worker == "ddp":
        sys.exit(ddp_worker(args))
    try:
        import kvframe_torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        text = f"## PyTorch step time\n\nskipped: {exc} (pip install -e integrations/torch torch)"
        print(text)
        return text
    load = os.getloadavg()[0]
    if args.hosts:
        records = run_hosts(args)
        title = (f"PyTorch step time on 2 simulated hosts, links {args.rate} both ways, 2 processes "
                 f"(kvframe: {args.servers} server(s), 'store' with compressed pulls)")
    else:
        records = run_loopback(args)
        title = f"PyTorch step time on loopback, 2 processes (kvframe: {args.servers} server(s))"
    text = report(records, title, args)
    text += (f"\n\nms/step: rank 0's best mean over {args.windows} windows of {args.steps} steps"
             f"{f' in each of {args.rounds} rounds of one job per system' if not args.hosts else ''}; CPU ms/step: "
             f"user + system time of every process of the job (workers, servers, scheduler) in that window, per "
             f"step; per-worker batch {BATCH}; 1 torch thread per process; {os.cpu_count()} cores, load average "
             f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return text


if __name__ == "__main__":
    main()
