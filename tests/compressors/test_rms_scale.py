"""2bit with threshold_scale='rms': the scale-free threshold. Checked against a plain numpy
reference of its definition (threshold x RMS of the residual-corrected gradient, the least-squares
value of the values sent), for error feedback, scale invariance, exact small arrays and bad input."""

import numpy as np
import pytest

import kvframe


def reference_step(x: np.ndarray, c: float):
    """(sent values, new residual) for the residual-corrected gradient ``x`` (float64 maths)."""
    t = np.float32(c * np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    above = np.abs(x) >= t
    v = np.float32(np.abs(x[above]).astype(np.float64).mean())
    sent = np.where(x >= t, v, np.where(x <= -t, -v, np.float32(0))).astype(np.float32)
    return sent, (x - sent).astype(np.float32), v


def test_config_defaults(make):
    assert make("2bit").config.threshold == 0.5  # MXNet's absolute default is unchanged
    cfg = make("2bit", threshold_scale="rms").config
    assert (cfg.threshold, cfg.raw_below) == (1.0, 256)
    assert make("2bit", threshold_scale="rms", threshold=0.7).config.threshold == 0.7
    assert make("2bit").block_multiple == 16 and make("2bit", threshold_scale="rms").block_multiple is None


@pytest.mark.parametrize("n", [256, 1000, 4099, 300_001])
def test_matches_its_definition_with_error_feedback(make, n):
    comp = make("2bit", threshold_scale="rms")
    rng = np.random.default_rng(n)
    res = np.zeros(n, np.float32)
    ref_res = np.zeros(n, np.float32)
    total, got = np.zeros(n, np.float64), np.zeros(n, np.float32)
    for _ in range(4):
        g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        g[::97] *= 50  # a heavy tail
        payload = comp.encode(g, res)
        sent, ref_res, v = reference_step(ref_res + g, 1.0)
        assert payload.nbytes == comp.compressed_nbytes(n) == 4 + 4 * -(-n // 16)
        assert payload[:4].view(np.float32)[0] == pytest.approx(v, rel=1e-5)
        out = np.full(n, 7, np.float32)
        comp.decode(payload, out)
        np.testing.assert_allclose(out, sent, rtol=1e-5, atol=0)
        np.testing.assert_allclose(res, ref_res, rtol=1e-4, atol=1e-7)
        comp.decode(payload, got, accumulate=True)
        total += g
    np.testing.assert_allclose(got + res, total, atol=1e-6)  # nothing is lost: error feedback


def test_scale_free(make):
    """Scaling the gradient by a power of two scales the payload's value and nothing else."""
    comp = make("2bit", threshold_scale="rms")
    g = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    a = comp.encode(g, np.zeros_like(g))
    b = comp.encode(g * np.float32(2.0 ** -20), np.zeros_like(g))
    assert np.array_equal(a[4:], b[4:])
    assert b[:4].view(np.float32)[0] == a[:4].view(np.float32)[0] * np.float32(2.0 ** -20)


def test_small_arrays_zeros_and_non_finite(make):
    comp = make("2bit", threshold_scale="rms")
    g = np.array([0.1, -3.0, 1e-8], np.float32)
    res = np.array([0.5, 0, 0], np.float32)
    payload = comp.encode(g, res)
    out = np.empty(3, np.float32)
    comp.decode(payload, out)
    assert payload.nbytes == comp.compressed_nbytes(3) == 16
    assert np.array_equal(out, np.array([0.5, 0, 0], np.float32) + g)
    assert not res.any()  # sent exactly: nothing left over
    z = np.zeros(1000, np.float32)
    payload = comp.encode(z, np.zeros(1000, np.float32))
    comp.decode(payload, out := np.ones(1000, np.float32))
    assert not out.any()
    bad = np.ones(1000, np.float32)
    bad[3] = np.nan
    res = np.zeros(1000, np.float32)
    comp.decode(comp.encode(bad, res), out)
    assert np.isnan(out[3]) and np.isfinite(out).sum() == 999 and not res.any()  # sent once, not kept


def test_bad_payloads_are_refused(make):
    comp = make("2bit", threshold_scale="rms")
    p = comp.encode(np.ones(1000, np.float32), np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="1000 elements"):
        comp.decode(p[:-4], np.empty(1000, np.float32))
    with pytest.raises(ValueError, match="4-byte value"):
        comp.decode(p[:2], np.empty(1000, np.float32))
    raw = comp.encode(np.ones(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="raw payload"):
        comp.decode(raw, np.empty(4, np.float32))


def test_array_code_path_equals_the_block_path(make):
    """The codes made with plain array operations (the path cupy arrays take) are the CPU blocks'."""
    comp = make("2bit", threshold_scale="rms")
    for n in (5, 64, 1001):
        r1 = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        r2 = r1.copy()
        t, v = np.float32(0.9), np.float32(1.4)
        a, b = np.empty(comp._codes_nbytes(n), np.uint8), np.empty(comp._codes_nbytes(n), np.uint8)
        comp._encode_codes(None, r1, a, t, -t, v)
        comp._encode_codes_xp(np, r2, b, t, v)
        assert np.array_equal(a, b) and np.array_equal(r1, r2)


def test_device_store_sums_compressed_devices(make):
    kv = kvframe.create("device")
    kv.set_gradient_compression({"type": "2bit", "threshold_scale": "rms"})
    kv.init("w", np.zeros(2048, np.float32))
    rng = np.random.default_rng(3)
    vals = [rng.standard_normal(2048).astype(np.float32) for _ in range(2)]
    out = np.empty(2048, np.float32)
    kv.pushpull("w", vals, out=out)
    comp = make("2bit", threshold_scale="rms")
    want = np.zeros(2048, np.float32)
    for v in vals:
        comp.decode(comp.encode(v, np.zeros(2048, np.float32)), want, accumulate=True)
    np.testing.assert_array_equal(out, want)
