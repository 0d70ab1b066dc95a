"""Installing from a clone, as the README says, from wheels alone, on the oldest numpy kvframe supports.

One module-scoped fixture does the slow part once: builds every distribution's wheel with
tools/build_wheels.py (what `make wheels` runs), creates a clean virtual environment (no
system site-packages) and installs ``kvframe[all]`` into it with ``--find-links`` to the wheels, beside
numpy 1.23.5 (the newest numpy Apache MXNet 1.9.1 runs with, and the floor kvframe declares); the
third-party dependencies come from this machine's usual index (pip's configuration and cache), and no
kvframe distribution can come from anywhere but the wheels (none is on an index; pip's report proves
where each came from). Every command then runs from a folder outside the repository, so no source tree
is on the path, and the tests check that kvframe's modules resolve into that environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # kvframe depends on tomli there
    import tomli as tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# The oldest numpy with wheels for this Python, which the environment pins (numpy 1.23.5 has wheels up
# to Python 3.11); on a newer Python, whatever pip picks within kvframe's requirement.
OLDEST_NUMPY = {(3, 10): "1.23.5", (3, 11): "1.23.5"}.get(sys.version_info[:2])

PLUGINS = {
    "stores": {"local", "device", "dist_sync", "dist_device_sync", "dist_async", "nccl"},
    "compressors": {"2bit", "1bit", "fp16", "bf16", "topk"},
    "optimizers": {"sgd", "adam", "lamb", "adamw"},
    "transports": {"tcp", "shm", "zmq"},
}
TEST_PLUGINS = {"listsum", "scaledsign", "halfsign", "plainpipe"}  # tests/plugins: never installed here


def _load_build_wheels():
    spec = importlib.util.spec_from_file_location("build_wheels", REPO / "tools" / "build_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ALL_NAMES = {tomllib.loads((REPO / d / "pyproject.toml").read_text())["project"]["name"]
             for d in _load_build_wheels().DISTRIBUTIONS}


def _setuptools_version() -> tuple[int, ...]:
    try:
        from importlib.metadata import version

        return tuple(int(x) for x in version("setuptools").split(".")[:2])
    except Exception:  # not installed, or an odd version string
        return (0,)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment (pip's configuration included) without anything that would put the
    repository or the development environment on the path, or configure kvframe."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("KVFRAME_", "DMLC_", "PS_"))}
    env.update(extra)
    return env


class Installed:
    def __init__(self, root: Path, wheels: list[Path], report: dict, seconds: dict[str, float]):
        self.root, self.wheels, self.report, self.seconds = root, wheels, report, seconds
        self.bin = root / "venv" / "bin"
        self.python = self.bin / "python"
        self.work = root / "work"  # the cwd of every command: outside the repository
        self.env = _clean_env(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")

    def run(self, *cmd: str | Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], cwd=self.work, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def site_packages(self) -> Path:
        out = self.run(self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        assert out.returncode == 0, out.stderr
        return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("from-wheels")
    seconds = {}
    t = time.monotonic()
    # pip's build isolation (what `make wheels` uses) installs setuptools afresh for each of the
    # builds, about 30 s here: where this environment has a setuptools that can build them, use it
    # instead, the same build otherwise.
    fast = _setuptools_version() >= (77,)
    wheels = _load_build_wheels().build(root / "wheelhouse", pip_args=["--no-build-isolation"] if fast else [])
    seconds["build"] = time.monotonic() - t

    t = time.monotonic()
    venv.create(root / "venv", with_pip=True, clear=True)  # clean: no system site-packages
    (root / "work").mkdir()
    inst = Installed(root, wheels, {}, seconds)
    pip = inst.run(inst.python, "-m", "pip", "--version")
    if tuple(int(x) for x in pip.stdout.split()[1].split(".")[:2]) < (22, 2):  # --report: pip 22.2
        proc = inst.run(inst.python, "-m", "pip", "install", "-q", "pip>=22.2", timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    reqs = ["kvframe[all]"] + ([f"numpy=={OLDEST_NUMPY}"] if OLDEST_NUMPY else [])
    proc = inst.run(inst.python, "-m", "pip", "install", "--disable-pip-version-check", "--only-binary", ":all:",
                    "--find-links", root / "wheelhouse", "--report", root / "report.json", *reqs, timeout=600)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    inst.report = json.loads((root / "report.json").read_text())
    seconds["install"] = time.monotonic() - t
    return inst


def _result(proc: subprocess.CompletedProcess) -> dict:
    """The JSON of the one ``RESULT {...}`` line (kvframe-launch prefixes a worker's lines with its role)."""
    lines = [ln.partition("RESULT ")[2] for ln in proc.stdout.splitlines() if "RESULT {" in ln]
    assert proc.returncode == 0 and len(lines) == 1, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[0])


# --- the wheels -----------------------------------------------------------------------------------

def test_every_distribution_builds_a_wheel_with_licence_readme_and_pinned_siblings(installed):
    names = {}
    licence = (REPO / "LICENSE").read_bytes()
    for whl in installed.wheels:
        with zipfile.ZipFile(whl) as z:
            meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = z.read(meta_name).decode()
            info = meta_name.rsplit("/", 1)[0]
            assert z.read(f"{info}/licenses/LICENSE") == licence, whl.name
        headers, _, body = meta.partition("\n\n")
        fields: dict[str, list[str]] = {}
        for ln in headers.splitlines():
            k, _, v = ln.partition(": ")
            fields.setdefault(k, []).append(v)
        name, version = fields.get("Name", [])[0], fields.get("Version", [])[0]
        names[name] = version
        assert fields.get("License-Expression", []) == ["Apache-2.0"], name
        assert fields.get("License-File", []) == ["LICENSE"], name
        assert fields.get("Description-Content-Type", []) == ["text/markdown"] and body.lstrip().startswith("#"), name
        series = ".".join(version.split(".")[:2])
        for req in fields.get("Requires-Dist", []):
            m = re.match(r"(kvframe(-[a-z]+)?)(\[[^\]]*\])?\s*([^;]*)", req)
            if m:  # a sibling: pinned to this release series
                assert m.group(4).strip() == f"=={series}.*", f"{name}: {req}"
    assert set(names) == ALL_NAMES
    assert len(set(names.values())) == 1, names


def test_kvframe_comes_from_the_wheels_only_and_no_source_tree_is_on_the_path(installed):
    wheelhouse = (installed.root / "wheelhouse").resolve().as_uri()
    ours = {item["metadata"]["name"]: item["download_info"]["url"] for item in installed.report["install"]
            if item["metadata"]["name"].startswith("kvframe")}
    assert set(ours) == ALL_NAMES - {"kvframe-torch"}, ours  # kvframe[all]: all but the torch integration
    assert all(url.startswith(wheelhouse + "/") and url.endswith(".whl") for url in ours.values()), ours
    assert "kvframe-testplugin" not in ours

    site = installed.site_packages()
    assert not list(site.glob("__editable__*")), "an editable install leaked into the environment"
    code = """if True:
        import importlib, importlib.metadata as md, json, numpy
        files = {}
        for d in md.distributions():
            if d.metadata["Name"].startswith("kvframe"):
                for top in {f.parts[0] for f in d.files if f.suffix == ".py" and len(f.parts) > 1}:
                    files[top] = importlib.import_module(top).__file__
        print(json.dumps({"numpy": numpy.__version__, "files": files}))"""
    out = installed.run(installed.python, "-c", code)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {"kvframe", "kvframe_local", "kvframe_dist", "kvframe_transports"} <= set(got["files"]), got
    for mod, f in got["files"].items():
        assert Path(f).resolve().is_relative_to(site.resolve()), f"{mod} imported from {f}, not {site}"
    if OLDEST_NUMPY:
        assert got["numpy"] == OLDEST_NUMPY


# --- the commands ---------------------------------------------------------------------------------

def test_python_m_kvframe_lists_the_installed_plugins_and_no_test_plugin(installed):
    proc = installed.run(installed.python, "-m", "kvframe", "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["failed"] == [], report["failed"]
    for kind, want in PLUGINS.items():
        names = {r["name"] for r in report[kind]}
        assert want <= names, (kind, names)
        assert not names & TEST_PLUGINS, (kind, names)
        assert all(r["distribution"].startswith("kvframe-") for r in report[kind]), report[kind]
    text = installed.run(installed.python, "-m", "kvframe", "plugins")
    assert text.returncode == 0 and "dist_sync" in text.stdout and "kvframe-dist 0.1" in text.stdout, text
    version = installed.run(installed.python, "-m", "kvframe", "--version")
    assert version.returncode == 0 and re.fullmatch(r"kvframe \d+\.\d+\.\d+\S*\n", version.stdout), version
    # the console script beside it
    assert installed.run(installed.bin / "kvframe", "--version").stdout == version.stdout


def test_kvframe_launch_version(installed):
    proc = installed.run(installed.bin / "kvframe-launch", "--version")
    assert proc.returncode == 0 and re.fullmatch(r"kvframe-launch \d+\.\d+\.\d+\S*\n", proc.stdout), proc


# --- the stores, on the oldest numpy --------------------------------------------------------------

def test_store_paths_give_exact_values_on_the_oldest_numpy(installed):
    (installed.work / "probe_stores.py").write_text((HERE / "probe_stores.py").read_text())
    got = _result(installed.run(installed.python, "probe_stores.py"))
    assert Path(got["kvframe_file"]).resolve().is_relative_to(installed.site_packages().resolve())
    if OLDEST_NUMPY:
        assert got["numpy"] == OLDEST_NUMPY

    assert got["local_sum"] == [[4.0] * 3] * 2
    assert got["local_repeated_key"] == [[0.75] * 3] * 2
    assert got["device_sum"] == [float(x) for x in np.float32([1.0, 1.2, -0.9, 0.2])]
    assert got["2bit_first"] == [0.5, 1.0, -0.5, 0.0]  # MXNet's hand-checked 2bit sequence
    assert got["2bit_second"] == [1.0, 1.0, -0.5, 0.0]
    assert got["row_sparse_pull"] == {"indices": [1, 3], "data": [[2.0, 3.0], [6.0, 7.0]]}
    assert got["row_sparse_sgd"][0::2] == [[1.0, 1.0]] * 3  # rows not pushed: untouched (lazy update)
    assert got["adam_step"][0][0] == pytest.approx(0.9, abs=1e-6)  # the first Adam step moves by lr
    assert "no store named 'no_such_store'" in got["unknown_store_error"]
    assert not any(name in got["unknown_store_error"] for name in TEST_PLUGINS), got["unknown_store_error"]

    # bit for bit what the development environment (newest numpy, numpy kernels) computes
    ref = _result(subprocess.run([sys.executable, str(installed.work / "probe_stores.py")], cwd=installed.work,
                                 env=_clean_env(KVFRAME_KERNELS="numpy"), capture_output=True, text=True,
                                 timeout=120))
    for key in ("local_sum", "local_repeated_key", "device_sum", "2bit_first", "2bit_second", "adam_step",
                "row_sparse_pull", "row_sparse_sgd"):
        assert got[key] == ref[key], f"{key}: numpy {got['numpy']} gives {got[key]}, numpy {ref['numpy']} {ref[key]}"


def test_dist_sync_job_over_loopback_through_kvframe_launch(installed):
    (installed.work / "dist_worker.py").write_text((HERE / "dist_worker.py").read_text())
    proc = installed.run(installed.bin / "kvframe-launch", "-n", "1", "-s", "1", "--", installed.python,
                         "dist_worker.py", timeout=180,
                         env={"KVFRAME_TIMEOUT": "60", "KVFRAME_CONNECT_TIMEOUT": "60"})
    got = _result(proc)
    assert got["sum"] == [1.5, 1.75, 2.0, 2.25, 2.5]
    assert got["rank"] == 0 and got["num_workers"] == 1
    site = installed.site_packages().resolve()
    assert Path(got["kvframe_file"]).resolve().is_relative_to(site)
    assert Path(got["kvframe_dist_file"]).resolve().is_relative_to(site)



# --- a third party's plugin on top (last: it adds a distribution to the environment) ---------------

PLUGIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "kvframe-foo"
version = "0.1.0"
requires-python = ">=3.10"
dependencies = ["kvframe>=0.1,<0.2", "numpy>=1.23.5", "pydantic>=2.5"]

[project.entry-points."kvframe.compressors"]
foocopy = "kvframe_foo"

[tool.setuptools.packages.find]
include = ["kvframe_foo*"]
"""

PLUGIN_MODULE = '''\
"""Compressor 'foocopy': sends the float32 values unchanged."""
from typing import Literal

import numpy as np

import kvframe
from kvframe.config import CompressionConfig


class FooCopyConfig(CompressionConfig):
    type: Literal["foocopy"] = "foocopy"


class FooCopy:
    def __init__(self, config):
        self.config = config

    def compressed_nbytes(self, size):
        return 4 * size

    def encode(self, grad, residual):
        return np.ascontiguousarray(grad, dtype=np.float32).reshape(-1).view(np.uint8).copy()

    def decode(self, payload, out, accumulate=False):
        vals = payload.view(np.float32).reshape(out.shape)
        if accumulate:
            out += vals
        else:
            out[...] = vals
        return out


@kvframe.hookimpl
def kvframe_register_compressors(register):
    register("foocopy", FooCopy, FooCopyConfig)
'''


def test_the_plugin_guides_pip_install_e_of_a_plugin_depending_on_kvframe(installed):
    """docs/plugin-guide.md, step 6: with kvframe installed from the wheels, `pip install -e .` of a
    plugin that depends on kvframe finds it (before, pip looked for kvframe on the index and failed)."""
    foo = installed.root / "kvframe-foo"
    (foo / "kvframe_foo").mkdir(parents=True)
    (foo / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (foo / "kvframe_foo" / "__init__.py").write_text(PLUGIN_MODULE)
    proc = installed.run(installed.python, "-m", "pip", "install", "--disable-pip-version-check", "-e", foo,
                         timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plugins = json.loads(installed.run(installed.python, "-m", "kvframe", "plugins", "--json").stdout)
    assert plugins["failed"] == []
    assert {"name": "foocopy", "distribution": "kvframe-foo"} in [
        {k: r[k] for k in ("name", "distribution")} for r in plugins["compressors"]]
    code = """if True:
        import numpy as np, kvframe
        kv = kvframe.create("device")
        kv.set_gradient_compression({"type": "foocopy"})
        kv.init(0, np.zeros(3, np.float32))
        kv.push(0, [np.float32([0.5, -1, 2]), np.float32([0.25, 1, 0])])
        out = np.empty(3, np.float32)
        kv.pull(0, out=out)
        print(out.tolist())"""
    proc = installed.run(installed.python, "-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[0.75, 0.0, 2.0]", proc.stdout + proc.stderr
