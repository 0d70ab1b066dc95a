"""set_gradient_compression validates the config before anything reaches the store."""

import numpy as np
import pytest

import kvframe
from kvframe.errors import ConfigError, NotSupportedError, PluginNotFoundError


@pytest.fixture
def kv():
    store = kvframe.create("device")
    yield store
    store.close()


@pytest.mark.parametrize("params, field", [
    ({"type": "2bit", "threshold": -1}, "threshold"),
    ({"type": "2bit", "threshold": 0}, "threshold"),
    ({"type": "2bit", "threshold": 1e-50}, "threshold"),  # 0 once rounded to float32
    ({"type": "2bit", "threshold": "abc"}, "threshold"),
    ({"type": "1bit", "threshold": float("inf")}, "threshold"),
    ({"type": "2bit", "thresh": 0.5}, "thresh"),
    ({"type": "topk", "ratio": 0}, "ratio"),
    ({"type": "topk", "ratio": 1.5}, "ratio"),
    ({"type": "fp16", "error_feedback": "maybe"}, "error_feedback"),
])
def test_bad_configs_are_refused_before_dispatch(kv, params, field):
    kv.set_gradient_compression({"type": "1bit", "threshold": 0.25})
    before = kv.backend.compressor
    with pytest.raises(ConfigError, match=rf"(?m)^\s+{field}: "):
        kv.set_gradient_compression(params)
    assert kv.backend.compressor is before  # the store was not touched
    assert kv.gradient_compression.threshold == 0.25


def test_unknown_type_names_the_installed_ones(kv):
    with pytest.raises(PluginNotFoundError, match=r"'3bit'.*installed: .*1bit.*2bit") as info:
        kv.set_gradient_compression({"type": "3bit"})
    assert "topk" in str(info.value)
    assert kv.backend.compressor is None
    with pytest.raises(ConfigError, match="'type' is required"):
        kv.set_gradient_compression({"threshold": 0.5})


def test_defaults_and_forms(kv):
    kv.set_gradient_compression({"type": "2bit"})
    assert kv.gradient_compression.threshold == 0.5 and kv.backend.compressor.threshold == np.float32(0.5)
    kv.set_gradient_compression("1bit")
    assert kv.gradient_compression.threshold == 0.0
    kv.set_gradient_compression({"type": "1bit", "threshold": -0.5})
    assert kv.backend.compressor.threshold == np.float32(-0.5)
    kv.set_gradient_compression("2BIT", threshold="0.25")  # MXNet passes strings; names are case-insensitive
    assert kv.backend.compressor.threshold == np.float32(0.25)
    kv.set_gradient_compression({"type": "topk", "ratio": 1})
    assert kv.backend.compressor.config.ratio == 1


def test_local_store_refuses_compression():
    kv = kvframe.create("local")
    with pytest.raises(NotSupportedError, match="not supported by store 'local'.*'device'"):
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    with pytest.raises(ConfigError, match="threshold"):  # a bad config is still reported first
        kv.set_gradient_compression({"type": "2bit", "threshold": -1})
    assert kv.gradient_compression is None
    assert kv.is_capable("compression") is False
    assert kvframe.create("device").is_capable("compression") is True
