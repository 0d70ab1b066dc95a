import pytest

from kvframe import plugins
from kvframe.plugins import validate_plugin_config


@pytest.fixture
def make():
    """make('2bit', threshold=0.5) -> a compressor built through the plugin registry."""

    def _make(name, **options):
        return plugins.create("compressors", validate_plugin_config("compressors", {"type": name, **options}, "test"))

    return _make
