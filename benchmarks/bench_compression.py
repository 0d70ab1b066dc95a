"""Store 'device' with and without gradient compression, against Apache MXNet 1.9.1's.

The workload of ../shared/anchors/mx_compress_bench.py: store 'device', 4 CPU copies (a list of 4
numpy arrays stands for 4 CPU contexts), push of the 4 copies + pull, 2^20 and 2^24 float32, with
no compression, '2bit' (threshold 0.5) and '1bit' (MXNet 1.9.1 has no '1bit': its column says so).
GB/s counts the gradients pushed (4 copies x 4 bytes x size per iteration), as the anchor does.

Usage: python benchmarks/bench_compression.py [--quick] [--no-mxnet]
"""

from __future__ import annotations

import re
import sys

import numpy as np

try:
    from benchmarks.common import ANCHORS, best_time, run_mxnet, table
except ImportError:  # run as a script
    from common import ANCHORS, best_time, run_mxnet, table

import kvframe

SIZES = [1 << 20, 1 << 24]
COMPRESSIONS = [None, "2bit", "1bit"]
NDEV = 4


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:g} KiB"


def kvframe_times(quick: bool) -> tuple[dict, dict]:
    res, wire = {}, {}
    rng = np.random.default_rng(0)
    for size in SIZES:
        vals = [rng.standard_normal(size, dtype=np.float32) for _ in range(NDEV)]
        for comp in COMPRESSIONS:
            kv = kvframe.create("device")
            if comp:
                kv.set_gradient_compression({"type": comp, "threshold": 0.5})
            kv.init(0, np.zeros(size, np.float32))
            out = np.zeros(size, np.float32)
            comp_obj = kv.backend.compressor
            wire[(size, comp)] = comp_obj.compressed_nbytes(size) if comp_obj else size * 4

            def step(kv=kv, out=out, vals=vals):
                kv.push(0, vals)
                kv.pull(0, out=out)

            reps = 10 if size <= 1 << 20 else 5
            res[(size, comp)] = best_time(step, 2 if quick else reps, rounds=2 if quick else 3)
            kv.close()
    return res, wire


_MX_LINE = re.compile(r"mx device ndev=4 size=(\d+) comp=(\S+): ([\d.]+) ms/iter")


def mxnet_times() -> tuple[dict, str]:
    """Times from the anchor script, and what it said about failures (MXNet 1.9.1 refuses '1bit')."""
    out = run_mxnet(ANCHORS / "mx_compress_bench.py")
    res, notes = {}, []
    for line in out.splitlines():
        m = _MX_LINE.search(line)
        if m:
            comp = None if m.group(2) == "None" else m.group(2)
            res[(int(m.group(1)), comp)] = float(m.group(3)) / 1e3
        elif line.startswith("comp="):  # e.g. "comp=1bit: MXNetError: ..." (1.9.1 knows only '2bit')
            comp, _, err = line.partition(":")
            notes.append(f"{comp.removeprefix('comp=')} refused ({err.strip().split(':')[0]})")
    return res, "; ".join(sorted(set(notes)))


def main(argv: list[str]) -> str:
    quick = "--quick" in argv
    ours, wire = kvframe_times(quick)
    mx, notes = mxnet_times() if "--no-mxnet" not in argv else ({}, "")
    rows = []
    for size in SIZES:
        for comp in COMPRESSIONS:
            t = ours[(size, comp)]
            m = mx.get((size, comp))
            gb = NDEV * size * 4 / 1e9
            sent = wire[(size, comp)]
            rows.append([f"2^{size.bit_length() - 1}", comp or "none", f"{_mib(sent)} ({size * 4 // sent}x)",
                         f"{t * 1e3:.2f}", f"{gb / t:.2f}",
                         f"{m * 1e3:.2f}" if m else "-", f"{gb / m:.2f}" if m else "-",
                         f"{m / t:.1f}x" if m else "-"])
    text = ("### device store, 4 CPU copies: push + pull, float32 (ms per iteration; GB/s of gradients pushed)\n\n"
            + table(["size", "compression", "sent per copy", "kvframe ms/iter", "kvframe GB/s", "MXNet 1.9.1 ms/iter",
                     "MXNet GB/s", "speed-up"], rows))
    if notes:
        text += f"\n\nMXNet 1.9.1: {notes}"
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
