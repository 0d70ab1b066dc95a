#!/usr/bin/env python3
"""Build a wheel of every kvframe distribution in this clone into one folder, and optionally install
from it: kvframe is not on PyPI, so ``pip install kvframe`` finds nothing, while ::

    python tools/build_wheels.py                         # -> wheelhouse/*.whl  (what `make wheels` runs)
    pip install --find-links wheelhouse 'kvframe[all]'   # into any environment, from those wheels

    python tools/build_wheels.py --install 'kvframe[all]'   # both steps, into this interpreter's environment

Third-party dependencies (numpy, pydantic, pluggy, pyzmq, ...) come from your usual index. Each
distribution is built from a clean copy of its folder (no stale ``build/`` left by an earlier build can
slip into a wheel, and nothing is written into the clone), with ``pip wheel --no-deps`` and pip's
usual build isolation. Needs only pip; setuptools comes from the index as each build asks for it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Every distribution of the repository (tests/plugins, a test-only stand-in for a third-party plugin,
# is not one of them). tests/packaging checks that this list misses no pyproject.toml.
DISTRIBUTIONS = [
    ".",
    "backends/local",
    "backends/device",
    "backends/dist",
    "backends/nccl",
    "compressors",
    "optimizers",
    "transports",
    "launcher",
    "integrations/torch",
]

# never copied into a build: build outputs, caches, virtual environments, version control
_IGNORE = shutil.ignore_patterns("build", "dist", "wheelhouse", "*.egg-info", "__pycache__", "*.pyc", ".*",
                                 "bench-results")


def _stage(dist: str, into: Path) -> Path:
    """A clean copy of one distribution's folder. The root distribution (the core, ``kvframe/``) needs
    only its own files, not the other distributions, tests or examples beside it."""
    src = REPO / dist
    dst = into / ("kvframe" if dist == "." else dist.replace("/", "-"))
    if dist == ".":
        dst.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(src / name, dst / name)
        shutil.copytree(src / "kvframe", dst / "kvframe", ignore=_IGNORE)
    else:
        shutil.copytree(src, dst, ignore=_IGNORE)
    return dst


def build(out: Path, dists: Sequence[str] = tuple(DISTRIBUTIONS), *, python: str = sys.executable,
          pip_args: Sequence[str] = (), quiet: bool = True) -> list[Path]:
    """Build the wheels of ``dists`` into ``out`` (replacing kvframe wheels already there); returns them."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("kvframe*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="kvframe-wheels-") as tmp:
        staged = [_stage(d, Path(tmp)) for d in dists]
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), *(["-q"] if quiet else []),
               *pip_args, *[str(p) for p in staged]]  # absolute paths: never mistaken for names on an index
        subprocess.run(cmd, check=True)
    wheels = sorted(out.glob("kvframe*.whl"))
    if len(wheels) != len(dists):
        raise RuntimeError(f"expected {len(dists)} wheels in {out}, found {[w.name for w in wheels]}")
    return wheels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default=str(REPO / "wheelhouse"), help="folder for the wheels (default: %(default)s)")
    p.add_argument("--install", nargs="+", metavar="REQ",
                   help="then pip-install these requirements (e.g. 'kvframe[all]') into this interpreter's "
                        "environment with --find-links to the wheels")
    p.add_argument("-v", "--verbose", action="store_true", help="show pip's output")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        wheels = build(out, quiet=not args.verbose)
    except subprocess.CalledProcessError as exc:
        print(f"build_wheels: pip wheel failed with status {exc.returncode}", file=sys.stderr)
        return 1
    print(f"{len(wheels)} wheels in {out}:")
    for w in wheels:
        print(f"  {w.name}")
    if args.install:
        cmd = [sys.executable, "-m", "pip", "install", "--find-links", str(out), *args.install]
        print("$ " + " ".join(cmd))
        return subprocess.run(cmd).returncode
    print(f"install with: pip install --find-links {out} 'kvframe[all]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
