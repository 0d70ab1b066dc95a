"""Shared pieces of the benchmarks: finding Apache MXNet 1.9.1's venv and the anchor scripts,
running them, and printing side-by-side tables."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KVFRAME_SHARED", REPO.parent / "shared"))
ANCHORS = SHARED / "anchors"
_MX_DEFAULT = REPO / ".venv-mxnet" if (REPO / ".venv-mxnet").exists() else REPO.parent / ".venv-mxnet"
MXNET_VENV = Path(os.environ.get("KVFRAME_MXNET_VENV", _MX_DEFAULT))  # setup-mxnet.sh makes .venv-mxnet here


def mxnet_python(setup: bool = True) -> Path | None:
    """The python of the MXNet 1.9.1 venv, made with the anchors' setup script when missing."""
    py = MXNET_VENV / "bin" / "python"
    if not py.exists() and setup and (ANCHORS / "setup-mxnet.sh").exists():
        subprocess.run(["bash", str(ANCHORS / "setup-mxnet.sh"), str(MXNET_VENV)], check=False)
    return py if py.exists() else None


def run_mxnet(code_or_script: str | Path, env: dict | None = None, timeout: float = 900,
              args: Sequence[str] = ()) -> str:
    """Run a script (a path) or code (a str) under MXNet's python; returns stdout, or '' if MXNet is missing."""
    py = mxnet_python()
    if py is None:
        print("  (MXNet 1.9.1 venv not available: MXNet figures skipped)", file=sys.stderr)
        return ""
    source = [str(code_or_script)] if isinstance(code_or_script, Path) else ["-c", code_or_script]
    cmd = [str(py), *source, *args]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if res.returncode != 0:
        print(f"  MXNet run failed ({res.returncode}): {res.stderr[-2000:]}", file=sys.stderr)
    return res.stdout


def best_time(fn: Callable[[], None], reps: int, rounds: int = 3, warmup: int = 1) -> float:
    """Seconds per call of ``fn``: the best of ``rounds`` averages over ``reps`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, ready to paste into a note."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


def memory_bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> float:
    """This machine's memory floor, in bytes moved per second: the best of ``reps`` one-thread
    copies of ``nbytes`` (a copy reads and writes, so it moves ``2 * nbytes``).  A benchmark's
    '% of floor' is (bytes its work must read and write / this) / its measured time."""
    import numpy as np

    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = best_time(lambda: np.copyto(dst, src), reps, rounds=1)
    return 2 * src.nbytes / t


def floor_percent(bytes_moved: float, seconds: float, bandwidth: float) -> str:
    """How close ``seconds`` comes to moving ``bytes_moved`` at ``bandwidth``: '57 %'."""
    return f"{100 * bytes_moved / bandwidth / seconds:.0f} %"
