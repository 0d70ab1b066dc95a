"""Every optimizer updates cupy arrays as it updates numpy arrays (GPU machines only)."""

from __future__ import annotations

import numpy as np
import pytest

from kvframe import plugins
from kvframe.plugins import validate_plugin_config

pytestmark = pytest.mark.gpu

# options that make each optimizer's step non-trivial; anything not listed runs with its defaults
OPTIONS = {
    "sgd": {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-3},
    "nag": {"learning_rate": 0.1, "momentum": 0.9},
    "signum": {"learning_rate": 0.01, "momentum": 0.9},
    "rmsprop": {"learning_rate": 0.01, "centered": True},
    "ftrl": {"learning_rate": 0.1},
    "sgld": {"learning_rate": 0.01, "seed": 1234},  # the same noise on both paths
}
SKIP = {"test"}  # the registry's test optimizer


def optimizer_names():
    """kvframe-optimizers' own registry (third-party test plugins may be numpy-only)."""
    from importlib import metadata

    names = {ep.name for ep in metadata.entry_points(group="kvframe.optimizers")
             if ep.dist is not None and ep.dist.metadata["Name"] == "kvframe-optimizers"}
    return sorted(names - SKIP)


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def make_updater(name, dtype):
    options = dict(OPTIONS.get(name, {}))
    try:
        config = validate_plugin_config("optimizers", {"type": name, **options}, "test")
    except Exception:
        config = validate_plugin_config("optimizers", {"type": name}, "test")
    return plugins.create("optimizers", config).create_updater()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", optimizer_names())
def test_cupy_step_equals_numpy_step(cp, name, dtype):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((33, 17)).astype(dtype)
    up_np, up_cp = make_updater(name, dtype), make_updater(name, dtype)
    w_np, w_cp = w.copy(), cp.asarray(w)
    for step in range(4):
        g = (rng.standard_normal(w.shape) * 0.5).astype(dtype)
        up_np(0, g, w_np)
        up_cp(0, cp.asarray(g), w_cp)
        assert isinstance(w_cp, cp.ndarray)
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(cp.asnumpy(w_cp), w_np, rtol=rtol, atol=rtol, err_msg=f"{name}, step {step}")
    # the states stay on the GPU, and a checkpoint made there loads on the CPU
    states = up_cp.states[0].arrays
    assert all(isinstance(a, cp.ndarray) for a in states.values()), f"{name}: states left the GPU"
    blob = up_cp.get_states()
    up_back = make_updater(name, dtype)
    up_back.set_states(blob)


def test_multi_precision_float16_on_gpu(cp):
    config = validate_plugin_config("optimizers", {"type": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                                                   "multi_precision": True}, "test")
    up_np = plugins.create("optimizers", config).create_updater()
    up_cp = plugins.create("optimizers", config).create_updater()
    rng = np.random.default_rng(8)
    w = rng.standard_normal(1000).astype(np.float16)
    w_np, w_cp = w.copy(), cp.asarray(w)
    for _ in range(5):
        g = rng.standard_normal(1000).astype(np.float16)
        up_np(1, g, w_np)
        up_cp(1, cp.asarray(g), w_cp)
    np.testing.assert_allclose(cp.asnumpy(w_cp).astype(np.float32), w_np.astype(np.float32), rtol=1e-3, atol=1e-3)
