"""A compressor from another distribution (tests/plugins) runs through set_gradient_compression."""

import numpy as np
import pytest

import kvframe
from kvframe import plugins
from kvframe.errors import ConfigError


def test_third_party_compressor_in_the_device_store():
    assert "scaledsign" in plugins.names("compressors")
    kv = kvframe.create("device")
    kv.set_gradient_compression({"type": "scaledsign"})
    reg = plugins.lookup("compressors", "scaledsign")
    assert reg.distribution == "kvframe-testplugin"
    a = np.float32([1.0, -2.0, 0.5, 0.0])
    b = np.float32([-1.0, -1.0, 3.0, 1.0])
    kv.init("w", np.zeros(4, np.float32))
    out = np.empty(4, np.float32)
    kv.push("w", [a, b])
    kv.pull("w", out=out)
    # each device sends sign(g) * mean|g|: a -> 0.875 * [1,-1,1,1], b -> 1.5 * [-1,-1,1,1]
    np.testing.assert_allclose(out, np.float32([0.875 - 1.5, -0.875 - 1.5, 0.875 + 1.5, 0.875 + 1.5]))
    # each device slot kept its own residual
    np.testing.assert_allclose(kv.backend.residual("w", 0), a - 0.875 * np.float32([1, -1, 1, 1]))
    np.testing.assert_allclose(kv.backend.residual("w", 1), b - 1.5 * np.float32([-1, -1, 1, 1]))


def test_third_party_config_is_validated():
    kv = kvframe.create("device")
    with pytest.raises(ConfigError, match="min_scale"):
        kv.set_gradient_compression({"type": "scaledsign", "min_scale": -1})
