"""Store 'local' against Apache MXNet 1.9.1's: push of N per-device copies + pull, float32.

The workload of ../shared/anchors/mx_local_bench.py, timed the same way on both sides (best of
several rounds) in one run.  Prints which path sums the copies (``KVFRAME_KERNELS``: numba's one-pass
sum or numpy's blocked adds), and ``% of floor``: the bytes an iteration must move (push: read the N
copies, write the stored sum (one copy: a copy in); pull: read it, write the output) over this
machine's one-thread copy bandwidth (``common.memory_bandwidth``), against the measured time.
The "donated" rows push one copy with ``donate=True`` (the store keeps the array instead of copying
it), against MXNet's one copy, which it keeps by reference.
Usage: python benchmarks/bench_local.py [--quick] [--no-mxnet]
"""

from __future__ import annotations

import json
import sys

import numpy as np

try:
    from benchmarks.common import best_time, floor_percent, memory_bandwidth, run_mxnet, table
except ImportError:  # run as a script
    from common import best_time, floor_percent, memory_bandwidth, run_mxnet, table

import kvframe
from kvframe.reduce import kernel_backend

SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 24]
NDEVS = [1, 4]


def reps_for(size: int) -> int:
    return max(5, min(20000, (1 << 26) // (size * 4)))


MXNET_CODE = """
import json, sys, time
import mxnet as mx
sizes, ndevs, quick = json.loads(sys.argv[1])
def best(fn, reps, rounds=3):
    fn(); mx.nd.waitall(); b = 1e9
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps): fn()
        mx.nd.waitall()
        b = min(b, (time.perf_counter() - t) / reps)
    return b
res = {}
for size in sizes:
    for ndev in ndevs:
        kv = mx.kv.create('local')
        kv.init(0, mx.nd.zeros((size,)))
        vals = [mx.nd.ones((size,), ctx=mx.cpu(i)) for i in range(ndev)]
        out = mx.nd.zeros((size,))
        def step():
            kv.push(0, vals); kv.pull(0, out=out)
        reps = max(5, min(20000, (1 << 26) // (size * 4)))
        if quick: reps = max(2, reps // 10)
        res[f"{size},{ndev}"] = best(step, reps)
print(json.dumps(res))
"""


def kvframe_times(quick: bool) -> dict:
    res = {}
    for size in SIZES:
        for ndev in NDEVS:
            kv = kvframe.create("local")
            kv.init(0, np.zeros(size, np.float32))
            vals = [np.ones(size, np.float32) for _ in range(ndev)]
            out = np.zeros(size, np.float32)

            def step(kv=kv, vals=vals, out=out):
                kv.push(0, vals)
                kv.pull(0, out=out)

            reps = reps_for(size)
            res[f"{size},{ndev}"] = best_time(step, max(2, reps // 10) if quick else reps)
            kv.close()
        # one copy handed over (push(..., donate=True)): the store keeps it instead of copying; two
        # gradients take turns, each pushed again only once the store has let go of it
        kv = kvframe.create("local")
        kv.init(0, np.zeros(size, np.float32))
        grads = [np.ones(size, np.float32), np.ones(size, np.float32)]
        out = np.zeros(size, np.float32)
        turn = [0]

        def donated(kv=kv, grads=grads, out=out, turn=turn):
            turn[0] ^= 1
            kv.push(0, grads[turn[0]], donate=True)
            kv.pull(0, out=out)

        reps = reps_for(size)
        res[f"{size},donated"] = best_time(donated, max(2, reps // 10) if quick else reps)
        kv.close()
    return res


def bytes_moved(size: int, ndev: int | str) -> int:
    """push: read the copies and write the stored value (one copy: read it, write it; donated: nothing);
    pull: read + write."""
    if ndev == "donated":
        return size * 4 * 2
    assert isinstance(ndev, int)
    return size * 4 * ((ndev + 1 if ndev > 1 else 2) + 2)


def main(argv: list[str]) -> str:
    quick = "--quick" in argv
    bandwidth = memory_bandwidth()
    path = kernel_backend()
    ours = kvframe_times(quick)
    out = run_mxnet(MXNET_CODE, args=[json.dumps([SIZES, NDEVS, quick])]) if "--no-mxnet" not in argv else ""
    mx = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    rows = []
    for size in SIZES:
        for ndev in [*NDEVS, "donated"]:
            k = f"{size},{ndev}"
            t = ours[k]
            moved = bytes_moved(size, ndev)
            m = mx.get(k if ndev != "donated" else f"{size},1")  # MXNet keeps a reference to one copy
            rows.append([f"2^{size.bit_length() - 1}", ndev, f"{t * 1e6:.1f}", f"{moved / t / 1e9:.2f}",
                         floor_percent(moved, t, bandwidth), f"{m * 1e6:.1f}" if m else "-",
                         f"{m / t:.2f}x" if m else "-"])
    text = ("### local store: push of N copies + pull, float32 (µs per iteration)\n\n"
            f"sum path: {path} (KVFRAME_KERNELS); memory floor: {bandwidth / 1e9:.1f} GB/s (one-thread copy, "
            "read + write); GB/s counts push's reads of the copies and write of the sum, and pull's read + write\n\n"
            + table(["size", "copies", "kvframe µs", "kvframe GB/s", "% of floor", "MXNet 1.9.1 µs", "speed-up"],
                    rows))
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
