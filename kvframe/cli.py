"""The ``kvframe`` command.

    kvframe plugins [--json]           installed stores, transports, compressors and optimizers
    kvframe validate [FILE] [--json]   check a config file (default: $KVFRAME_CONFIG)
    kvframe config-schema [-o FILE]    JSON Schema of the config file for the installed plugins
    kvframe bench [--quick] [...]      run benchmarks/run_all.py from the source tree
    kvframe timeline FILE... [-o OUT]  merge KVFRAME_TIMELINE files onto one clock, for Perfetto
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from kvframe import plugins
from kvframe.errors import KVFrameError

KIND_TITLES = {"stores": "stores", "transports": "transports", "compressors": "compressors",
               "optimizers": "optimizers"}


# plugins --------------------------------------------------------------------------------------

def _disabled_entry_points() -> list[dict[str, str]]:
    blocked = {n.strip() for n in os.environ.get("KVFRAME_DISABLE_PLUGINS", "").split(",") if n.strip()}
    out: list[dict[str, str]] = []
    if not blocked:
        return out
    for kind in plugins.KINDS:
        for ep in metadata.entry_points(group=f"kvframe.{kind}"):
            ep_dist: metadata.Distribution | None = getattr(ep, "dist", None)
            dist = ep_dist.metadata["Name"] if ep_dist is not None else None
            if ep.name in blocked or (dist is not None and dist in blocked):
                out.append({"kind": kind, "name": ep.name, "distribution": dist or "?"})
    return out


def plugin_report() -> dict[str, Any]:
    """Everything `kvframe plugins` shows, as plain data (imports every installed plugin)."""
    failed = plugins.load_all()
    report: dict[str, Any] = {}
    for kind in plugins.KINDS:
        report[kind] = [{"name": r.name, "distribution": r.distribution or "(in-process)",
                         "version": r.version or "", "module": r.plugin,
                         "config": f"{r.config_model.__module__}.{r.config_model.__qualname__}"}
                        for r in plugins.registrations(kind)]
    report["failed"] = []
    for key, reason in sorted(failed.items()):
        group, _, name = key.partition(":")
        dist = "?"
        for ep in metadata.entry_points(group=group):
            ep_dist: metadata.Distribution | None = getattr(ep, "dist", None)
            if ep.name == name and ep_dist is not None:
                dist = f"{ep_dist.metadata['Name']} {ep_dist.version}"
        report["failed"].append({"kind": group.removeprefix("kvframe."), "name": name, "distribution": dist,
                                 "reason": reason})
    report["disabled"] = _disabled_entry_points()
    return report


def _cmd_plugins(args: argparse.Namespace) -> int:
    report = plugin_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for kind, title in KIND_TITLES.items():
        rows = report[kind]
        print(f"{title} ({len(rows)}):")
        if not rows:
            print("  (none installed)")
        w = max((len(r["name"]) for r in rows), default=0)
        wd = max((len(f"{r['distribution']} {r['version']}".strip()) for r in rows), default=0)
        for r in rows:
            dist = f"{r['distribution']} {r['version']}".strip()
            print(f"  {r['name']:<{w}}  {dist:<{wd}}  {r['module']}")
    if report["failed"]:
        print(f"failed to load ({len(report['failed'])}):")
        for f in report["failed"]:
            print(f"  {f['kind'][:-1]} {f['name']!r} from {f['distribution']}: {f['reason']}")
    if report["disabled"]:
        print(f"disabled by KVFRAME_DISABLE_PLUGINS ({len(report['disabled'])}):")
        for d in report["disabled"]:
            print(f"  {d['kind'][:-1]} {d['name']!r} from {d['distribution']}")
    return 0


# validate -------------------------------------------------------------------------------------

def _cmd_validate(args: argparse.Namespace) -> int:
    from kvframe.configfile import ENV_CONFIG, load_config

    if args.file is None and not os.environ.get(ENV_CONFIG):
        print(f"kvframe validate: give a config file, or set {ENV_CONFIG}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.file)
    except KVFrameError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        dump = {"source": cfg.source, "store": cfg.store.model_dump(mode="json"), "store_name": cfg.store_name,
                "compression": cfg.compression.model_dump(mode="json") if cfg.compression else None,
                "optimizer": cfg.optimizer.model_dump(mode="json") if cfg.optimizer else None,
                "app": cfg.app, "overrides": cfg.overrides}
        print(json.dumps(dump, indent=2, default=str))  # TOML/YAML dates, YAML binary and sets: as text
    else:
        print(f"{cfg.source}: valid")
        print(cfg.summary())
    return 0


# config-schema --------------------------------------------------------------------------------

def _cmd_config_schema(args: argparse.Namespace) -> int:
    from kvframe.configfile import json_schema

    schema = json_schema()
    text = json.dumps(schema, indent=args.indent)
    for note in schema.get("x-kvframe-skipped", []):
        print(f"kvframe config-schema: left out {note}", file=sys.stderr)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"kvframe config-schema: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


# bench ----------------------------------------------------------------------------------------

def bench_runner() -> Path | None:
    """benchmarks/run_all.py of the source tree kvframe is imported from, if there is one."""
    p = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"
    return p if p.is_file() else None


def _cmd_bench(args: argparse.Namespace) -> int:
    runner = bench_runner()
    if runner is None:
        print("kvframe bench runs benchmarks/run_all.py from a source checkout of kvframe, and there is none "
              f"beside {Path(__file__).resolve().parent} (an installed wheel has no benchmarks): clone the "
              "repository and pip install -e it", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(runner), "--out", args.out]
    if args.quick:
        cmd.append("--quick")
    if args.no_mxnet:
        cmd.append("--no-mxnet")
    elif not args.setup_mxnet:
        cmd.append("--no-mxnet-setup")  # MXNet only where its venv already is
    for name in args.only or []:
        cmd += ["--only", name]
    if args.no_plot:
        cmd.append("--no-plot")
    return subprocess.call(cmd)


# timeline -------------------------------------------------------------------------------------

def _cmd_timeline(args: argparse.Namespace) -> int:
    from kvframe import timeline

    try:
        files = timeline.expand(args.files)
    except FileNotFoundError as exc:
        print(f"kvframe timeline: {exc}", file=sys.stderr)
        return 1
    out = args.output or timeline.default_output(files)
    if out is None:
        print("kvframe timeline: give -o OUT (the files do not share one KVFRAME_TIMELINE name)", file=sys.stderr)
        return 2
    out_path = os.path.abspath(out)
    files = [f for f in files if os.path.abspath(f) != out_path]  # never read the output being written
    if not files:
        print(f"kvframe timeline: nothing to merge but the output {out}", file=sys.stderr)
        return 1
    try:
        doc, summary, notes = timeline.merge(files)
    except (OSError, ValueError) as exc:
        print(f"kvframe timeline: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"kvframe timeline: {note}", file=sys.stderr)
    try:
        Path(out).write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"kvframe timeline: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    w = max((len(r["process"]) for r in summary), default=0)
    for r in summary:
        print(f"{r['process']:<{w}}  {r['events']:>7} events  {r['ops']:>6} ops  span {r['span_us'] / 1000:10.3f} ms  "
              f"from {r['start_us'] / 1000:.3f} ms  ({r['file']})")
    print(f"wrote {out}: {len(summary)} processes; open it in https://ui.perfetto.dev (or chrome://tracing)")
    return 0


# main -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from kvframe import __version__

    parser = argparse.ArgumentParser(prog="kvframe", description="kvframe: a key-value store for data-parallel "
                                     "training with Apache MXNet's KVStore API, built from plugins")
    parser.add_argument("--version", action="version", version=f"kvframe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plugins", help="list installed plugins with their distributions, and any that failed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("validate", help="validate a config file (TOML or YAML) with the installed plugins' models")
    p.add_argument("file", nargs="?", help="the config file (default: $KVFRAME_CONFIG)")
    p.add_argument("--json", action="store_true", help="print the validated config as JSON")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("config-schema", help="print the JSON Schema of the config file (for editors)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--indent", type=int, default=2)
    p.set_defaults(func=_cmd_config_schema)

    p = sub.add_parser("bench", help="run the benchmarks (benchmarks/run_all.py) and plot throughput")
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke run, not a measurement")
    p.add_argument("--only", action="append", metavar="NAME", help="run only bench_NAME.py (repeatable)")
    p.add_argument("--out", default="bench-results", help="folder for the PNG plot and results (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-mxnet", action="store_true", help="skip the Apache MXNet 1.9.1 side")
    p.add_argument("--setup-mxnet", action="store_true",
                   help="create MXNet 1.9.1's venv when it is missing (by default MXNet runs only if it is there)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("timeline", help="merge KVFRAME_TIMELINE files (one per process) onto one clock for Perfetto")
    p.add_argument("files", nargs="+", metavar="FILE", help="per-process timeline files, or the KVFRAME_TIMELINE "
                   "value that named them (trace.json finds trace.worker0.json, trace.server0.json, ...)")
    p.add_argument("-o", "--output", help="the merged trace (default: trace.json for trace.*.json, "
                   "DIR/timeline.json for a directory)")
    p.set_defaults(func=_cmd_timeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KVFrameError as exc:
        print(f"kvframe {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `kvframe config-schema | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
