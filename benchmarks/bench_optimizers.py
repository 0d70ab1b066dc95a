"""Updates per second of one 2^22-element float32 parameter through a store's updater: ``kv.push``
on store 'local' with the optimizer set, kvframe versus Apache MXNet 1.9.1 driven the same way
(``mx.kv.create('local')``, ``kv.set_optimizer(mx.optimizer.create(...))``, ``kv.push``).

Each kvframe row names the kernel path that ran (``KVFRAME_KERNELS``: the compiled numba steps or
the numpy kernels; by default both, numba first, where numba is installed) and its ``% of floor``:
the bytes the step must move (each array it reads or writes, once) over this machine's one-thread
copy bandwidth (``common.memory_bandwidth``), against the measured time.

    .venv/bin/python benchmarks/bench_optimizers.py [--size 22] [--reps 20] [--kernels numba,numpy]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, floor_percent, memory_bandwidth, run_mxnet, table  # noqa: E402

import kvframe  # noqa: E402

CASES = [
    ("sgd+momentum", "sgd", {"learning_rate": 0.01, "momentum": 0.9, "wd": 1e-4}),
    ("adam", "adam", {"learning_rate": 1e-3, "wd": 1e-4}),
    ("lamb", "lamb", {"learning_rate": 1e-3, "wd": 1e-4}),
]
# arrays of the parameter's size each step must read or write once
TRAFFIC = {
    "sgd+momentum": (5, "read w, g, mom; write w, mom"),
    "adam": (7, "read w, g, m, v; write w, m, v"),
    "lamb": (10, "direction: read w, g, m, v; write m, v, u (norms of w and u); apply: read w, u; write w"),
}

MXNET_CODE = r"""
import json, sys, time
import numpy as np
import mxnet as mx
n, reps, rounds = {n}, {reps}, {rounds}
cases = json.loads({cases!r})
res = {{}}
rs = np.random.RandomState(0)
w0 = rs.randn(n).astype(np.float32)
g0 = (rs.randn(n) * 1e-3).astype(np.float32)
for label, name, kw in cases:
    kv = mx.kv.create('local')
    kv.init(0, mx.nd.array(w0))
    kv.set_optimizer(mx.optimizer.create(name, **kw))
    g = mx.nd.array(g0)
    out = mx.nd.zeros(n)
    for _ in range(3):
        kv.push(0, g)
    kv.pull(0, out=out); mx.nd.waitall()
    best = float('inf')
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            kv.push(0, g)
        kv.pull(0, out=out); mx.nd.waitall()
        best = min(best, (time.perf_counter() - t) / reps)
    res[label] = best
print("RESULT " + json.dumps(res))
"""


def kernel_paths(wanted: str | None) -> list[str]:
    """The kernel paths to time: ``wanted`` (comma-separated), else numba (where it imports) and numpy."""
    from kvframe_optimizers import engine

    from kvframe import kernels

    if wanted:
        return [w.strip() for w in wanted.split(",") if w.strip()]
    return (["numba"] if kernels.compiled(engine.COMPILED) is not None else []) + ["numpy"]


def bench_kvframe(n: int, reps: int, rounds: int, path: str | None = None) -> dict[str, float]:
    """Seconds per push, per case, with ``KVFRAME_KERNELS=path`` (None: as the environment says)."""
    from kvframe_optimizers import kernel_backend

    saved = os.environ.get("KVFRAME_KERNELS")
    if path is not None:
        os.environ["KVFRAME_KERNELS"] = path
    try:
        assert path is None or kernel_backend() == path
        return _bench_kvframe(n, reps, rounds)
    finally:
        if saved is None:
            os.environ.pop("KVFRAME_KERNELS", None)
        else:
            os.environ["KVFRAME_KERNELS"] = saved


def _bench_kvframe(n: int, reps: int, rounds: int) -> dict[str, float]:
    rs = np.random.RandomState(0)
    w0 = rs.randn(n).astype(np.float32)
    g = (rs.randn(n) * 1e-3).astype(np.float32)
    res = {}
    for label, name, kw in CASES:
        kv = kvframe.create("local")
        kv.init(0, w0.copy())
        kv.set_optimizer(name, **kw)
        res[label] = best_time(lambda kv=kv: kv.push(0, g), reps, rounds=rounds, warmup=3)
        kv.close()
    return res


def bench_mxnet(n: int, reps: int, rounds: int) -> dict[str, float]:
    out = run_mxnet(MXNET_CODE.format(n=n, reps=reps, rounds=rounds, cases=json.dumps(CASES)))
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=22, help="log2 of the parameter's element count")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-mxnet", action="store_true")
    ap.add_argument("--kernels", default=None,
                    help="kernel paths to time, comma-separated (numba, numpy); default: both (numba if installed)")
    args = ap.parse_args(argv)
    n = 1 << args.size
    bandwidth = memory_bandwidth()
    paths = kernel_paths(args.kernels)
    mine = {path: bench_kvframe(n, args.reps, args.rounds, path) for path in paths}
    theirs = {} if args.no_mxnet else bench_mxnet(n, args.reps, args.rounds)
    rows = []
    for label, _, _ in CASES:
        m = theirs.get(label)
        moved = TRAFFIC[label][0] * n * 4
        for path in paths:
            k = mine[path][label]
            rows.append([label, path, f"{1 / k:,.1f}", f"{k * 1e3:.2f}", f"{moved / 1e6:.0f}",
                         floor_percent(moved, k, bandwidth), f"{1 / m:,.1f}" if m else "n/a",
                         f"{m * 1e3:.2f}" if m else "n/a", f"{m / k:.2f}x" if m else "n/a"])
    print(f"optimizer updates of one 2^{args.size}-element float32 parameter via kv.push on store 'local'; "
          f"memory floor: {bandwidth / 1e9:.1f} GB/s (one-thread copy, read + write)")
    print(table(["optimizer", "kernels", "kvframe upd/s", "kvframe ms", "MB moved", "% of floor", "MXNet 1.9.1 upd/s",
                 "MXNet ms", "kvframe speed / MXNet"], rows))
    print("MB moved: " + "; ".join(f"{label}: {what}" for label, (_, what) in TRAFFIC.items()))


if __name__ == "__main__":
    main()
