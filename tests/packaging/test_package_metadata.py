"""What every distribution declares (licence, readme, versions of its siblings, numpy floor), that the
wheel builder knows every distribution, that `make demo` leaves the test plugins out, and
`python -m kvframe`. Fast: nothing is built or installed (test_wheels.py does that, marked slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # kvframe depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
NUMPY_FLOOR = "numpy>=1.23.5"


def _build_wheels():
    spec = importlib.util.spec_from_file_location("build_wheels", REPO / "tools" / "build_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DISTRIBUTIONS = _build_wheels().DISTRIBUTIONS


def _project(dist: str) -> dict:
    return tomllib.loads((REPO / dist / "pyproject.toml").read_text())["project"]


def test_the_wheel_builder_knows_every_distribution():
    found = set()
    for folder, dirs, files in os.walk(REPO):
        # not into virtual environments, caches, build outputs, or tests/ (tests/plugins is test-only)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in
                   {"tests", "build", "wheelhouse", "__pycache__", "node_modules"} and not d.endswith(".egg-info")]
        if "pyproject.toml" in files:
            found.add(Path(folder).relative_to(REPO).as_posix())
    assert found == set(DISTRIBUTIONS)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_licence_readme_and_versions(dist):
    project = _project(dist)
    folder = REPO / dist
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert (folder / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes(), f"{dist}/LICENSE is not the root's"
    assert project["readme"] == "README.md" and (folder / "README.md").read_text().startswith("# ")
    assert project["version"] == _project(".")["version"], "the distributions are released together"
    series = ".".join(project["version"].split(".")[:2])
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    for req in reqs:
        m = re.match(r"(kvframe(-[a-z]+)?)(\[[^\]]*\])?(.*)", req)
        if m:
            assert m.group(4) == f"=={series}.*", f"{dist}: sibling {req!r} is not pinned to the release series"
    numpy = [r for r in project.get("dependencies", []) if r.startswith("numpy")]
    if dist == "launcher":  # kvframe-launch uses no numpy of its own
        assert numpy == [], (dist, numpy)
    elif dist != "integrations/torch":  # needs numpy>=2.2 (see its pyproject.toml)
        assert numpy == [NUMPY_FLOOR], (dist, numpy)


def test_fast_extras_pull_numba():
    for dist in ("compressors", "optimizers"):
        assert _project(dist)["optional-dependencies"]["fast"] == ["numba>=0.59"]
    fast = _project(".")["optional-dependencies"]["fast"]
    assert {r.split("==")[0] for r in fast} == {"numba>=0.59", "kvframe-compressors[fast]", "kvframe-optimizers[fast]"}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_no_test_plugin_and_make_test_does(tmp_path):
    """A dry run (make -n) against a virtual environment that does not exist: every command shows."""

    def dry(target):
        proc = subprocess.run(["make", "-n", "-C", str(REPO), target, f"VENV={tmp_path / 'venv'}"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    demo, test = dry("demo"), dry("test")
    assert "-m venv" in demo and "-e backends/local" in demo and "train_digits.py" in demo
    assert "tests/plugins" not in demo
    assert "-e tests/plugins" in test and "pytest" in test
    assert "build_wheels.py" in dry("wheels")


def test_python_m_kvframe(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvframe", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=tmp_path, timeout=120)
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("kvframe "), version
    plugins = run("plugins", "--json")
    assert plugins.returncode == 0, plugins.stderr
    assert {"local", "device", "dist_sync"} <= {r["name"] for r in json.loads(plugins.stdout)["stores"]}
    usage = run()
    assert usage.returncode == 2 and "usage: kvframe" in usage.stderr
