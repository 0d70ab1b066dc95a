import os

import pytest

from kvframe import plugins


@pytest.fixture(autouse=True)
def cfgtest_plugin(monkeypatch):
    """Registers the in-process test plugin and clears every KVFRAME_X__Y override from the environment."""
    import kvframe_cfgtest_plugin as mod

    for name in list(os.environ):
        if name.startswith("KVFRAME_") and "__" in name[8:] or name == "KVFRAME_CONFIG":
            monkeypatch.delenv(name)
    plugins.register_plugin(mod, name="kvframe_cfgtest_plugin")
    mod.CREATED.clear()
    mod.CLOSED.clear()
    yield mod
    plugins.unregister_plugin("kvframe_cfgtest_plugin")
