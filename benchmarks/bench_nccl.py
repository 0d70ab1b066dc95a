"""Store 'nccl' on the GPU: throughput against cupy.cuda.nccl called directly and a device copy;
the 2bit compressor's encode+decode rate on the GPU.

For each size (2^20..2^28 bytes of float32, one array per visible GPU, single-process mode):

* ``copy``: a device-to-device copy of the same bytes on GPU 0 (cupy ``copyto``);
* ``nccl allreduce`` / ``nccl reduce+bcast``: ``cupy.cuda.nccl`` called directly, one group per
  collective, the streams synchronised after each iteration;
* ``kvframe pushpull``: ``kv.pushpull(key, values, out=outs)`` (one all-reduce; also with
  ``pushpull_stores=False``, which skips the copy into the store), and ``kvframe push+pull``
  (reduce to GPU 0, broadcast back). Each call waits for the GPUs, as the direct loops do.

Bandwidths follow nccl-tests (doc/PERFORMANCE.md): algbw = S / t; busbw = algbw x 2(n-1)/n for
all-reduce, x 1 for reduce and for broadcast, so a reduce followed by a broadcast moves 2S bus
bytes: busbw = 2S / t. With one GPU the all-reduce busbw is 0 by that definition; algbw still
compares the paths. The copy's column counts S / t (and 2S / t, read plus write, in brackets).
The 2bit rate is gradient bytes per second through encode then decode (GB/s = 1e9 bytes/s).

Usage: python benchmarks/bench_nccl.py [--quick] [--sizes 20,24,28] [--json PATH]
Without cupy, NCCL or a GPU it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks.common import table
except ImportError:  # run as a script
    from common import table


def gpu_stack():
    """(cupy, nccl, device count), or a message saying what is missing."""
    try:
        from kvframe_nccl.cuda import NcclUnavailableError, require
    except ImportError as exc:
        return None, f"kvframe-nccl is not installed ({exc}): pip install -e backends/nccl"
    try:
        stack = require()
    except NcclUnavailableError as exc:
        return None, str(exc)
    return stack, ""


def timed(fn, sync, reps: int, rounds: int = 3, warmup: int = 2) -> float:
    """Seconds per call: the best of ``rounds`` means over ``reps`` calls, each followed by ``sync``."""
    for _ in range(warmup):
        fn()
        sync()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
            sync()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def reps_for(nbytes: int, quick: bool) -> int:
    reps = max(3, min(100, (1 << 31) // max(nbytes, 1)))
    return max(2, reps // 10) if quick else reps


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _collectives_one_size(cp, nccl, kvframe, comms, devices, streams, sync, nbytes: int, quick: bool) -> dict:
    n = len(devices)
    count = nbytes // 4
    sends, recvs = [], []
    for d in devices:
        with cp.cuda.Device(d):
            sends.append(cp.ones(count, cp.float32))
            recvs.append(cp.zeros(count, cp.float32))
    reps = reps_for(nbytes, quick)
    rounds = 2 if quick else 3
    with cp.cuda.Device(devices[0]):
        src, dst = sends[0], recvs[0]
        t_copy = timed(lambda: cp.copyto(dst, src), streams[0].synchronize, reps, rounds)

    def direct_allreduce():
        nccl.groupStart()
        for c, s, r, st in zip(comms, sends, recvs, streams):
            c.allReduce(s.data.ptr, r.data.ptr, count, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, st.ptr)
        nccl.groupEnd()

    def direct_reduce_bcast():
        nccl.groupStart()
        for c, s, r, st in zip(comms, sends, recvs, streams):
            c.reduce(s.data.ptr, r.data.ptr, count, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 0, st.ptr)
        nccl.groupEnd()
        nccl.groupStart()
        for c, r, st in zip(comms, recvs, streams):
            c.broadcast(r.data.ptr, r.data.ptr, count, nccl.NCCL_FLOAT32, 0, st.ptr)
        nccl.groupEnd()

    t_ar = timed(direct_allreduce, sync, reps, rounds)
    t_rb = timed(direct_reduce_bcast, sync, reps, rounds)

    results = {}
    for label, options in (("pushpull", {}), ("pushpull_nostore", {"pushpull_stores": False}), ("push+pull", {})):
        kv = kvframe.create("nccl", devices=devices, **options)
        kv.init(0, np.zeros(count, np.float32))

        def step(kv=kv, label=label):
            if label == "push+pull":
                kv.push(0, sends)
                kv.pull(0, out=recvs)
            else:
                kv.pushpull(0, sends, out=recvs)

        results[label] = timed(step, sync, reps, rounds)
        kv.close()
    ar_factor = 2 * (n - 1) / n
    row = {
        "bytes": nbytes, "gpus": n,
        "copy_s": t_copy, "nccl_allreduce_s": t_ar, "nccl_reduce_bcast_s": t_rb,
        "kv_pushpull_s": results["pushpull"], "kv_pushpull_nostore_s": results["pushpull_nostore"],
        "kv_push_pull_s": results["push+pull"],
    }
    row["copy_algbw"] = gbps(nbytes, t_copy)
    for key, factor in (("nccl_allreduce", ar_factor), ("kv_pushpull", ar_factor),
                        ("kv_pushpull_nostore", ar_factor), ("nccl_reduce_bcast", 2.0), ("kv_push_pull", 2.0)):
        row[f"{key}_algbw"] = gbps(nbytes, row[f"{key}_s"])
        row[f"{key}_busbw"] = row[f"{key}_algbw"] * factor
    return row


def bench_collectives(cp, nccl, sizes: list[int], quick: bool) -> list[dict]:
    import kvframe

    devices = list(range(cp.cuda.runtime.getDeviceCount()))
    comms = nccl.NcclCommunicator.initAll(devices)
    streams = []
    for d in devices:
        with cp.cuda.Device(d):
            streams.append(cp.cuda.get_current_stream())

    def sync():
        for d, s in zip(devices, streams):
            with cp.cuda.Device(d):
                s.synchronize()

    rows = []
    for log2 in sizes:
        rows.append(_collectives_one_size(cp, nccl, kvframe, comms, devices, streams, sync, 1 << log2, quick))
        cp.get_default_memory_pool().free_all_blocks()
    for c in comms:
        c.destroy()
    return rows


def _2bit_one_size(cp, comp, nbytes: int, quick: bool) -> dict:
    stream = cp.cuda.get_current_stream()
    count = nbytes // 4
    grad = cp.random.standard_normal(count, dtype=cp.float32)
    residual = cp.zeros(count, cp.float32)
    out = cp.empty(count, cp.float32)
    dst = cp.empty_like(grad)
    payload = comp.encode(grad, residual)
    reps = reps_for(nbytes, quick)
    rounds = 2 if quick else 3
    t_enc = timed(lambda: comp.encode(grad, residual), stream.synchronize, reps, rounds)
    t_dec = timed(lambda: comp.decode(payload, out), stream.synchronize, reps, rounds)
    t_both = timed(lambda: comp.decode(comp.encode(grad, residual), out), stream.synchronize, reps, rounds)
    t_copy = timed(lambda: cp.copyto(dst, grad), stream.synchronize, reps, rounds)
    return {"bytes": nbytes, "encode_GBps": gbps(nbytes, t_enc), "decode_GBps": gbps(nbytes, t_dec),
            "encode_decode_GBps": gbps(nbytes, t_both), "copy_GBps": gbps(nbytes, t_copy),
            "ratio_to_copy": t_copy / t_both}


def bench_2bit(cp, sizes: list[int], quick: bool) -> list[dict]:
    from kvframe import plugins
    from kvframe.plugins import validate_plugin_config

    try:
        comp = plugins.create("compressors", validate_plugin_config("compressors", {"type": "2bit", "threshold": 0.5},
                                                                    "2bit"))
    except Exception as exc:
        print(f"(2bit compressor unavailable: {type(exc).__name__}: {exc})")
        return []
    rows = []
    for log2 in sizes:
        rows.append(_2bit_one_size(cp, comp, 1 << log2, quick))
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def size_label(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-mxnet", action="store_true", help="(accepted for run_all.py; MXNet is not run here)")
    ap.add_argument("--sizes", default=None, help="comma-separated log2 byte sizes (default 20..28)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    stack, why = gpu_stack()
    if stack is None:
        print(f"bench_nccl: skipped, no GPU here: {why}")
        return 0
    cp, nccl = stack.cupy, stack.nccl
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [20, 24, 28] if args.quick else list(range(20, 29)))
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    n = cp.cuda.runtime.getDeviceCount()
    print(f"GPUs: {n} x {name}; cupy {cp.__version__}; NCCL {nccl.get_version()}\n")

    rows = bench_collectives(cp, nccl, sizes, args.quick)
    print(f"Collectives over {n} GPU(s), float32, GB/s (algbw / busbw as nccl-tests; ratio = kvframe time / "
          "direct NCCL time, lower is better)\n")
    print(table(
        ["size", "copy algbw", "nccl allreduce", "kvframe pushpull", "ratio", "pushpull (no store copy)", "ratio",
         "nccl reduce+bcast", "kvframe push+pull", "ratio"],
        [[size_label(r["bytes"]),
          f"{r['copy_algbw']:.0f} ({2 * r['copy_algbw']:.0f})",
          f"{r['nccl_allreduce_algbw']:.0f} / {r['nccl_allreduce_busbw']:.0f}",
          f"{r['kv_pushpull_algbw']:.0f} / {r['kv_pushpull_busbw']:.0f}",
          f"{r['kv_pushpull_s'] / r['nccl_allreduce_s']:.2f}",
          f"{r['kv_pushpull_nostore_algbw']:.0f} / {r['kv_pushpull_nostore_busbw']:.0f}",
          f"{r['kv_pushpull_nostore_s'] / r['nccl_allreduce_s']:.2f}",
          f"{r['nccl_reduce_bcast_algbw']:.0f} / {r['nccl_reduce_bcast_busbw']:.0f}",
          f"{r['kv_push_pull_algbw']:.0f} / {r['kv_push_pull_busbw']:.0f}",
          f"{r['kv_push_pull_s'] / r['nccl_reduce_bcast_s']:.2f}"] for r in rows]))
    two = bench_2bit(cp, sizes, args.quick)
    if two:
        print("\n2bit on GPU 0 (threshold 0.5), GB/s of float32 gradient; ratio = encode+decode rate / copy rate\n")
        print(table(["size", "encode", "decode", "encode+decode", "copy", "ratio"],
                    [[size_label(r["bytes"]), f"{r['encode_GBps']:.0f}", f"{r['decode_GBps']:.0f}",
                      f"{r['encode_decode_GBps']:.0f}", f"{r['copy_GBps']:.0f}", f"{r['ratio_to_copy']:.2f}"]
                     for r in two]))
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": name, "gpus": n, "collectives": rows, "2bit": two}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
