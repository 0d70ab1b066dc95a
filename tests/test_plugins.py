"""Plugin discovery through entry points, and the errors a user can act on."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvframe
from kvframe import plugins
from kvframe.errors import DuplicateRegistrationError, PluginImportError, PluginNotFoundError


def test_default_store_is_local():
    kv = kvframe.create()
    assert kv.type == "local"
    assert type(kv.backend).__module__ == "kvframe_local.store"


def test_pip_installed_third_party_store_is_found():
    # tests/plugins is pip-installed by the test setup (make test); nothing in kvframe names it
    kv = kvframe.create("listsum")
    kv.init("w", np.zeros(3, np.float32))
    kv.push("w", [np.full(3, 2.0, np.float32), np.full(3, 5.0, np.float32)])
    out = np.empty(3, np.float32)
    kv.pull("w", out=out)
    np.testing.assert_array_equal(out, [7.0, 7.0, 7.0])
    reg = plugins.lookup("stores", "listsum")
    assert reg.distribution == "kvframe-testplugin"
    assert reg.version == "0.0.1"


def run_python(code, **env):
    import os

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    return proc


def test_disabling_a_plugin_gives_the_missing_plugin_message():
    code = """
        import kvframe
        try:
            kvframe.create('listsum')
        except kvframe.errors.PluginNotFoundError as e:
            print('ERR', e)
        print('names', kvframe.plugins.names('stores'))
    """
    proc = run_python(code, KVFRAME_DISABLE_PLUGINS="listsum")
    assert proc.returncode == 0, proc.stderr
    assert "ERR no store named 'listsum'" in proc.stdout
    assert "disabled by KVFRAME_DISABLE_PLUGINS" in proc.stdout
    assert "'listsum'" not in proc.stdout.split("names")[1]
    # blocking by distribution name works too
    proc = run_python(code, KVFRAME_DISABLE_PLUGINS="kvframe-testplugin")
    assert "ERR no store named 'listsum'" in proc.stdout


def test_unknown_store_lists_installed_and_names_distribution():
    with pytest.raises(PluginNotFoundError) as e:
        kvframe.create("no_such_store")
    msg = str(e.value)
    assert "no store named 'no_such_store'" in msg
    assert "local" in msg and "listsum" in msg
    assert "entry point group 'kvframe.stores'" in msg


def test_known_store_without_its_distribution_says_what_to_install():
    code = """
        import kvframe
        try:
            kvframe.create('nccl')
        except kvframe.errors.PluginNotFoundError as e:
            print('ERR', e)
        except Exception as e:
            print('OTHER', type(e).__name__)
    """
    proc = run_python(code, KVFRAME_DISABLE_PLUGINS="kvframe-nccl,nccl")
    assert "ERR" in proc.stdout, proc.stdout + proc.stderr


def test_lookup_imports_only_the_plugin_asked_for():
    code = """
        import sys, kvframe
        names = kvframe.plugins.names('stores')
        assert 'listsum' in names and 'local' in names
        assert 'kvframe_testplugin.store' not in sys.modules
        kvframe.create('local')
        assert 'kvframe_testplugin.store' not in sys.modules, 'listing or creating local imported listsum'
        kvframe.create('listsum')
        assert 'kvframe_testplugin.store' in sys.modules
        print('ok')
    """
    proc = run_python(code)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_broken_plugin_names_its_distribution_and_error_and_breaks_nothing_else(tmp_path, monkeypatch, make_dist):
    make_dist(tmp_path, "kvframe-broken", """
        [kvframe.stores]
        brokenstore = kvframe_broken_mod
        """, {"kvframe_broken_mod": "import kvframe_no_such_dependency\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginImportError) as e:
        kvframe.create("brokenstore")
    msg = str(e.value)
    assert "kvframe-broken" in msg and "kvframe_no_such_dependency" in msg and "ModuleNotFoundError" in msg
    assert kvframe.create("local").type == "local"
    assert "kvframe.stores:brokenstore" in plugins.load_all()


def test_duplicate_name_is_refused_naming_both_plugins():
    class Other:
        @kvframe.hookimpl
        def kvframe_register_stores(self, register):
            from kvframe_testplugin.store import ListSumConfig, ListSumStore

            register("listsum", ListSumStore, ListSumConfig)

    plugins.lookup("stores", "listsum")
    with pytest.raises(DuplicateRegistrationError) as e:
        plugins.register_plugin(Other(), name="other-plugin")
    assert "other-plugin" in str(e.value) and "kvframe_testplugin.store" in str(e.value)
    plugins.unregister_plugin("other-plugin")
    assert plugins.lookup("stores", "listsum").plugin == "kvframe_testplugin.store"


def test_in_process_plugin_registration_and_store_options_validated():
    from typing import Literal

    from kvframe_local import LocalConfig, LocalStore

    from kvframe.config import StoreConfig
    from kvframe.errors import ConfigError

    class TinyConfig(StoreConfig):
        type: Literal["tiny"] = "tiny"
        threads: int = 1

    class Tiny:
        @kvframe.hookimpl
        def kvframe_register_stores(self, register):
            register("tiny", lambda cfg: LocalStore(LocalConfig(reduce_threads=cfg.threads)), TinyConfig)

    plugins.register_plugin(Tiny(), name="tiny-plugin")
    try:
        assert kvframe.create("tiny", threads=2).type == "tiny"
        with pytest.raises(ConfigError, match=r"threads: Input should be a valid integer"):
            kvframe.create("tiny", threads="many")
        with pytest.raises(ConfigError, match=r"colour: Extra inputs are not permitted"):
            kvframe.create("tiny", colour="red")
    finally:
        plugins.unregister_plugin("tiny-plugin")
    with pytest.raises(PluginNotFoundError):
        kvframe.create("tiny")


def test_mxnet_store_aliases():
    assert kvframe.create("local_allreduce_cpu").type == "local_allreduce_cpu"
    assert type(kvframe.create("LOCAL").backend).__name__ == "LocalStore"


def test_optimizer_hook_old_name_still_registers_with_a_deprecation_warning():
    from kvframe.config import OptimizerConfig

    class OldCfg(OptimizerConfig):
        type: str = "oldhookopt"

    class OldStyle:
        @kvframe.hookimpl
        def kvframe_register_updaters(self, register):
            register("oldhookopt", lambda cfg: ("made", cfg.type), OldCfg)

    with pytest.warns(DeprecationWarning, match="kvframe_register_updaters is now kvframe_register_optimizers"):
        plugins.register_plugin(OldStyle(), name="old-hook-plugin")
    try:
        assert plugins.build("optimizers", "oldhookopt", "test") == ("made", "oldhookopt")
    finally:
        plugins.unregister_plugin("old-hook-plugin")
