"""Run every benchmarks/bench_*.py in turn, print their tables, and plot throughput against size.

Each bench module has ``main(argv)``, which prints Markdown tables (and may return their text).
Every table with a ``size`` column (``2^N`` or a number) and time columns (headers with µs or ms)
becomes lines of the plot: throughput in elements per second (size / time) against size, one line
per time column and per value of the other key columns (copies, workers...).

Usage: python benchmarks/run_all.py [--quick] [--only NAME] [--no-mxnet] [--no-mxnet-setup]
                                    [--out DIR] [--no-plot]
``--no-mxnet-setup`` runs MXNet 1.9.1 only when its venv already exists (``kvframe bench``'s default).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `benchmarks.common` importable when run as a script


def bench_files(only: list[str] | None = None) -> list[Path]:
    files = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in only}
        files = [f for f in files if f.stem.removeprefix("bench_") in wanted]
    return files


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


def run_one(path: Path, argv: list[str]) -> str:
    """Import and run one bench module; returns everything it printed.  The common flags
    (--quick, --no-mxnet) go only to benches whose source mentions them."""
    source = path.read_text(encoding="utf-8")
    argv = [a for a in argv if a in source]
    spec = importlib.util.spec_from_file_location(f"benchmarks.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    saved_argv = sys.argv
    sys.argv = [str(path), *argv]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
            spec.loader.exec_module(module)
            main = getattr(module, "main", None)
            if main is None:
                raise AttributeError(f"{path.name} has no main(argv)")
            try:
                main(list(argv))
            except SystemExit as exc:  # a bench's argparse, or an explicit exit
                if exc.code not in (0, None):
                    raise RuntimeError(f"{path.name} exited with status {exc.code}") from None
    finally:
        sys.argv = saved_argv
        sys.path.remove(str(path.parent))
    return buf.getvalue()


# tables -> series -------------------------------------------------------------------------------

def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Markdown tables in ``text`` as (title, headers, rows); the title is the nearest heading above."""
    tables, title, lines, i = [], "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("#"):
            title = line.lstrip("# ").strip()
        if line.strip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s\-:|]+\|\s*$", lines[i + 1]):
            headers, rows = _cells(line), []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append((title, headers, rows))
            continue
        i += 1
    return tables


def _size(cell: str) -> float | None:
    m = re.fullmatch(r"2\^(\d+)", cell)
    if m:
        return float(2 ** int(m.group(1)))
    try:
        return float(cell.replace(",", "").replace("_", ""))
    except ValueError:
        return None


def _number(cell: str) -> float | None:
    try:
        return float(cell.rstrip("x"))
    except ValueError:
        return None


def _time_unit(header: str) -> float | None:
    """Seconds per unit of a time column ('kvframe µs', 'MXNet ms/iter'), or None."""
    words = re.split(r"[\s/()]+", header.lower())
    if "µs" in words or "us" in words:
        return 1e-6
    if "ms" in words:
        return 1e-3
    return None


def throughput_series(text: str) -> dict[str, list[tuple[float, float]]]:
    """{label: [(size, elements per second), ...]} from every table with a size and time columns.

    Time columns are those in µs or ms; the other columns whose values repeat across sizes (copies,
    compression...) split the lines; rates, ratios and per-row descriptions are left out."""
    series: dict[str, list[tuple[float, float]]] = {}
    for title, headers, rows in parse_tables(text):
        low = [h.lower() for h in headers]
        if "size" not in low:
            continue
        si = low.index("size")
        rows = [r for r in rows if len(r) == len(headers) and _size(r[si]) is not None]
        if not rows:
            continue
        units = {j: _time_unit(h) for j, h in enumerate(headers)}
        time_cols = [j for j, u in units.items() if u is not None and j != si]
        nsizes = len({r[si] for r in rows})
        key_cols = [j for j, h in enumerate(low) if j != si and j not in time_cols and "/s" not in h
                    and "speed" not in h and "ratio" not in h and len({r[j] for r in rows}) * nsizes <= len(rows)]
        short = re.sub(r"\s*\(.*\)\s*$", "", title)
        for r in rows:
            size = _size(r[si])
            extra = ", ".join(f"{headers[j]}={r[j]}" for j in key_cols)
            for j in time_cols:
                t = _number(r[j])
                if t is None or t <= 0:
                    continue
                name = re.sub(r"\s*\b(µs|us|ms)\b(/\w+)?", "", headers[j]).strip()
                label = f"{short}: {name}" + (f" ({extra})" if extra else "")
                series.setdefault(label, []).append((size, size / (t * units[j])))
    return series


def plot(series: dict[str, list[tuple[float, float]]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'kvframe[bench]')", file=sys.stderr)
        return None
    if not series:
        print("plot skipped: no table with a size column and µs or ms columns was printed", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, pts in sorted(series.items()):
        pts = sorted(pts)
        style = "--" if "mxnet" in label.lower() else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("array size (elements)")
    ax.set_ylabel("throughput (elements per second)")
    with_mx = any("mxnet" in label.lower() for label in series)
    ax.set_title("kvframe" + (" (solid) vs Apache MXNet 1.9.1 (dashed)" if with_mx else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append")
    ap.add_argument("--no-mxnet", action="store_true")
    ap.add_argument("--no-mxnet-setup", action="store_true")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    passthrough = ["--quick"] if args.quick else []
    if args.no_mxnet:
        passthrough.append("--no-mxnet")
    elif args.no_mxnet_setup:
        from benchmarks.common import MXNET_VENV, mxnet_python

        if mxnet_python(setup=False) is None:
            print(f"(Apache MXNet 1.9.1 venv not found at {MXNET_VENV}: kvframe figures only; "
                  "`kvframe bench --setup-mxnet` creates it)\n")
            passthrough.append("--no-mxnet")
    files = bench_files(args.only)
    if not files:
        print(f"no benchmarks/bench_*.py{' matching ' + str(args.only) if args.only else ''} in {HERE}",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    texts, failed = {}, []
    for f in files:
        print(f"## {f.name}\n", flush=True)
        t0 = time.perf_counter()
        try:
            texts[f.stem] = run_one(f, passthrough)
        except Exception:
            failed.append(f.name)
            traceback.print_exc()
        print(f"\n({f.name}: {time.perf_counter() - t0:.1f} s)\n", flush=True)
    series = throughput_series("\n".join(texts.values()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"tables": texts, "throughput": series}, indent=1))
    if not args.no_plot:
        png = plot(series, out_dir / "throughput.png")
        if png:
            print(f"plot: {png}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
