"""Store 'device' with and without gradient compression, against Apache MXNet 1.9.1's.

The workload of ../shared/anchors/mx_compress_bench.py: store 'device', 4 CPU copies (a list of 4
numpy arrays stands for 4 CPU contexts), push of the 4 copies + pull, 2^20 and 2^24 float32, with
no compression, '2bit' (threshold 0.5) and '1bit' (MXNet 1.9.1 has no '1bit': its column says so).
GB/s counts the gradients pushed (4 copies x 4 bytes x size per iteration), as the anchor does.

'% of floor' compares a time with the least memory traffic an iteration must move at this machine's
memory bandwidth (``common.memory_bandwidth()``: a one-thread copy, reads + writes).  Per iteration,
for ``n`` float32 values and 4 copies:

* no compression: read the 4 gradients (16n bytes), write the merged value (4n), and the pull
  reads it and writes the caller's array (8n): 28n bytes;
* 2bit / 1bit: read the 4 gradients (16n), read and write the 4 residuals (32n), write the merged
  value (4n; encode, decode and sum stay in cache, the payload never reaches memory), and the
  pull's read + write (8n): 60n bytes (1.0 GB at 2^24).

The CPU codecs' path (compiled numba kernels or numpy, ``KVFRAME_KERNELS``) is printed with the table.

Usage: python benchmarks/bench_compression.py [--quick] [--no-mxnet]
"""

from __future__ import annotations

import re
import sys

import numpy as np

try:
    from benchmarks.common import ANCHORS, best_time, floor_percent, memory_bandwidth, run_mxnet, table
except ImportError:  # run as a script
    from common import ANCHORS, best_time, floor_percent, memory_bandwidth, run_mxnet, table

import kvframe

SIZES = [1 << 20, 1 << 24]
COMPRESSIONS = [None, "2bit", "1bit"]
NDEV = 4


def bytes_moved(size: int, comp: str | None) -> int:
    """The memory traffic one push + pull must move (see the module docstring)."""
    return (28 if comp is None else 60) * size


def kernel_path() -> str:
    """Which CPU path the 2bit/1bit codecs run here (numba kernels or numpy)."""
    try:
        from kvframe_compressors import kernel_backend
    except ImportError:
        return "unknown"
    return kernel_backend()


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
    bw = memory_bandwidth()
    ours, wire = kvframe_times(quick)
    mx, notes = mxnet_times() if "--no-mxnet" not in argv else ({}, "")
    rows = []
    for size in SIZES:
        for comp in COMPRESSIONS:
            t = ours[(size, comp)]
            m = mx.get((size, comp))
            gb = NDEV * size * 4 / 1e9
            sent = wire[(size, comp)]
            moved = bytes_moved(size, comp)
            rows.append([f"2^{size.bit_length() - 1}", comp or "none", f"{_mib(sent)} ({size * 4 // sent}x)",
                         f"{moved / 1e6:.0f}", f"{t * 1e3:.2f}", f"{gb / t:.2f}", floor_percent(moved, t, bw),
                         f"{m * 1e3:.2f}" if m else "-", floor_percent(moved, m, bw) if m else "-",
                         f"{m / t:.1f}x" if m else "-"])
    text = ("### device store, 4 CPU copies: push + pull, float32 (ms per iteration; GB/s of gradients pushed)\n\n"
            f"CPU codec path: {kernel_path()}; memory floor: {bw / 1e9:.1f} GB/s (one-thread copy, read + write); "
            "'MB moved': the traffic an iteration must move (module docstring)\n\n"
            + table(["size", "compression", "sent per copy", "MB moved", "kvframe ms/iter", "kvframe GB/s",
                     "kvframe % of floor", "MXNet 1.9.1 ms/iter", "MXNet % of floor", "speed-up"], rows))
    if notes:
        text += f"\n\nMXNet 1.9.1: {notes}"
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
