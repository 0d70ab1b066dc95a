"""The 2bit and 1bit cupy kernels give the numpy path's bytes, residuals and values, bit for bit
(GPU machines only). Built through the plugin registry, as a store builds them."""

from __future__ import annotations

import numpy as np
import pytest

from kvframe import plugins
from kvframe.plugins import validate_plugin_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def make(name, **options):
    return plugins.create("compressors", validate_plugin_config("compressors", {"type": name, **options}, "test"))


def special_values(n, rng):
    g = (rng.standard_normal(n) * 0.7).astype(np.float32)
    edge = np.float32([0.5, -0.5, 0.0, -0.0, 1e-30, -1e-30, 3.4e38, -3.4e38, 0.49999997, -0.50000006])
    g[: min(n, edge.size)] = edge[: min(n, edge.size)]
    return g


@pytest.mark.parametrize("name, threshold", [("2bit", 0.5), ("2bit", 1e-3), ("2bit", 3.0), ("1bit", 0.0),
                                             ("1bit", 0.25), ("1bit", -1.0)])
@pytest.mark.parametrize("n", [1, 3, 16, 31, 32, 33, 4096 + 7, 3 * (1 << 20) + 11])
def test_bit_identical_to_numpy(cp, name, threshold, n):
    comp = make(name, threshold=threshold)
    rng = np.random.default_rng(n)
    res_np, res_cp = np.zeros(n, np.float32), cp.zeros(n, cp.float32)
    for step in range(3):
        g = special_values(n, rng) if step == 0 else (rng.standard_normal(n) * 0.7).astype(np.float32)
        p_np = comp.encode(g, res_np)
        p_cp = comp.encode(cp.asarray(g), res_cp)
        assert comp.compressed_nbytes(n) == p_np.nbytes == p_cp.nbytes
        assert cp.asnumpy(p_cp).tobytes() == np.asarray(p_np).tobytes(), f"payload differs at step {step}"
        assert cp.asnumpy(res_cp).tobytes() == res_np.tobytes(), f"residual differs at step {step}"
        d_np, d_cp = np.empty(n, np.float32), cp.empty(n, cp.float32)
        comp.decode(p_np, d_np)
        comp.decode(p_cp, d_cp)
        assert cp.asnumpy(d_cp).tobytes() == d_np.tobytes()
        acc_np, acc_cp = np.full(n, 0.125, np.float32), cp.full(n, 0.125, cp.float32)
        comp.decode(p_np, acc_np, accumulate=True)
        comp.decode(p_cp, acc_cp, accumulate=True)
        assert cp.asnumpy(acc_cp).tobytes() == acc_np.tobytes()


@pytest.mark.parametrize("name", ["2bit", "1bit"])
def test_payload_decodes_across_paths(cp, name):
    """A payload made on the GPU decodes on the CPU to the same values, and the other way round."""
    comp = make(name)
    g = (np.random.default_rng(5).standard_normal(1000) * 0.8).astype(np.float32)
    p_cp = comp.encode(cp.asarray(g), cp.zeros(1000, cp.float32))
    p_np = comp.encode(g, np.zeros(1000, np.float32))
    out_a, out_b = np.empty(1000, np.float32), cp.empty(1000, cp.float32)
    comp.decode(cp.asnumpy(p_cp), out_a)
    comp.decode(cp.asarray(p_np), out_b)
    assert out_a.tobytes() == cp.asnumpy(out_b).tobytes()


@pytest.mark.parametrize("name, threshold", [("2bit", 1e-39), ("1bit", 0.0)])
def test_denormal_gradients_bit_identical(cp, name, threshold):
    """Subnormal floats are not flushed to zero on the GPU (the numpy path keeps them)."""
    comp = make(name, threshold=threshold)
    g = np.float32([1e-39, -1e-39, 5e-45, -5e-45, 1.1e-38, 0.0] * 11)
    res_np, res_cp = np.zeros(g.size, np.float32), cp.zeros(g.size, cp.float32)
    for _ in range(3):
        p_np = comp.encode(g, res_np)
        p_cp = comp.encode(cp.asarray(g), res_cp)
        assert cp.asnumpy(p_cp).tobytes() == np.asarray(p_np).tobytes()
        assert cp.asnumpy(res_cp).tobytes() == res_np.tobytes()
