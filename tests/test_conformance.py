"""Every built-in single-process store, and the third-party test plugin, pass the conformance suite;
the suite also runs as a pytest plugin with --kvframe-store, and it catches a store that breaks the
semantics."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from kvframe import plugins
from kvframe.testing import StoreConformance


def _installed(name):
    return pytest.mark.skipif(name not in plugins.names("stores"), reason=f"store {name!r} is not installed")


class TestLocalConformance(StoreConformance):
    store_name = "local"


class TestLocalThreadedConformance(StoreConformance):
    """The chunked, thread-pool path of 'local', forced on with a tiny bound."""

    store_name = "local"
    store_options = {"bigarray_bound": 4, "reduce_threads": 2}


@_installed("device")
class TestDeviceConformance(StoreConformance):
    store_name = "device"


class TestListSumConformance(StoreConformance):
    """The third-party store in tests/plugins (pip-installed by the test setup)."""

    store_name = "listsum"
    optimizer_states = False  # a minimal store: it runs updaters but cannot save their states


SLOPPY_STORE = """
    # A store that gets MXNet's semantics wrong on purpose: it keeps only the last per-device value
    # instead of summing, and pushpull handles one key at a time (push then pull).
    from typing import Literal
    import numpy as np
    import kvframe
    from kvframe.config import StoreConfig
    from kvframe.backend import COMPLETED, StoreBackend

    class SloppyConfig(StoreConfig):
        type: Literal["sloppy"] = "sloppy"

    class Sloppy(StoreBackend):
        capabilities = frozenset()

        def __init__(self, config):
            super().__init__(config)
            self.values = {}

        def init(self, keys, values):
            for k, v in zip(keys, values):
                self.values[k] = np.array(v, copy=True)

        def push(self, keys, values, priority=0):
            for k, vals in zip(keys, values):
                self.values[k][...] = vals[-1]

        def pull(self, keys, outs, priority=0, ignore_sparse=True):
            for k, os_ in zip(keys, outs):
                for o in os_:
                    o[...] = self.values[k]
            return COMPLETED

        def pushpull(self, keys, values, outs, priority=0):
            for k, v, o in zip(keys, values, outs):
                self.push([k], [v])
                self.pull([k], [o])
            return COMPLETED

    @kvframe.hookimpl
    def kvframe_register_stores(register):
        register("sloppy", Sloppy, SloppyConfig)
"""


def run_suite_as_plugin(tmp_path, *args):
    """A plugin author's test folder: a conftest loading the plugin and an empty subclass."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["kvframe.testing.conformance"]\n')
    (tmp_path / "test_mystore.py").write_text(
        "from kvframe.testing import StoreConformance\n\n\nclass TestMyStore(StoreConformance):\n    pass\n")
    info = tmp_path / "kvframe_sloppy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvframe-sloppy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kvframe.stores]\nsloppy = kvframe_sloppy\n")
    (tmp_path / "kvframe_sloppy.py").write_text(textwrap.dedent(SLOPPY_STORE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_conformance_as_a_pytest_plugin_with_a_store_option(tmp_path):
    proc = run_suite_as_plugin(tmp_path, "--kvframe-store", "local", "--kvframe-store-options",
                               '{"reduce_threads": 2}')
    assert proc.returncode == 0, proc.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    assert passed >= 30
    assert "failed" not in proc.stdout.splitlines()[-1]


def test_conformance_without_a_store_skips_with_the_reason(tmp_path):
    proc = run_suite_as_plugin(tmp_path)
    last = proc.stdout.splitlines()[-1]
    assert "passed" not in last and "skipped" in last, proc.stdout[-2000:]
    assert "pass --kvframe-store NAME" in proc.stdout


def test_conformance_catches_a_store_with_wrong_semantics(tmp_path):
    proc = run_suite_as_plugin(tmp_path, "--kvframe-store", "sloppy")
    assert proc.returncode == 1
    failed = set(re.findall(r"FAILED test_mystore.py::TestMyStore::(\w+)", proc.stdout))
    assert {"test_per_device_list_is_summed", "test_repeated_key_in_one_push_is_summed",
            "test_key_list_with_per_device_lists",
            "test_list_key_pushpull_finishes_every_reduction_before_writing"} <= failed, proc.stdout[-3000:]
    assert "test_init_then_pull" not in failed and "test_unknown_key_is_an_error" not in failed
    # what it cannot do is skipped, not failed
    assert "store 'sloppy' is not capable of 'optimizer'" in proc.stdout
