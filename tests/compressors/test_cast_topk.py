"""fp16 / bf16 casting and topk sparsification with error feedback."""

import math
import struct

import numpy as np
import pytest

from kvframe.errors import DTypeMismatchError


def _bf16_reference(x: float) -> int:
    """Round a float32 to the nearest bfloat16 (ties to even), one value at a time in float64."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if math.isnan(x):
        return None  # any NaN pattern
    lower = bits & 0xFFFF0000
    upper = lower + 0x10000

    def value(b):
        if b & 0x7FFFFFFF == 0x7F800000 and b != (bits & 0xFFFF0000):
            return math.copysign(2.0**128, x)  # rounding up past the largest finite bfloat16
        return struct.unpack("<f", struct.pack("<I", b))[0]

    if math.isinf(x):
        return bits >> 16
    lo, hi = value(lower), value(upper)
    dlo, dhi = abs(float(np.float32(x)) - lo), abs(float(np.float32(x)) - hi)
    if dlo < dhi or (dlo == dhi and (lower >> 16) % 2 == 0):
        return lower >> 16
    return (upper >> 16) & 0xFFFF


def test_bf16_rounding_against_reference(make):
    specials = [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.005859375, 3.4e38, -3.39e38, 1e-40, float("inf"),
                -float("inf"), 65504.0, 0.1, -2.5e-3]
    rng = np.random.default_rng(3)
    vals = np.concatenate([np.float32(specials), (rng.standard_normal(500) * 10.0 ** rng.integers(-8, 8, 500))
                           .astype(np.float32)])
    comp = make("bf16", error_feedback=False)
    p = comp.encode(vals, np.zeros_like(vals))
    assert p.dtype == np.uint16 and p.nbytes == comp.compressed_nbytes(vals.size) == 2 * vals.size
    for x, got in zip(vals, p):
        assert int(got) == _bf16_reference(float(x)), (float(x), hex(int(got)))
    nan = comp.encode(np.float32([np.nan, -np.nan]), np.zeros(2, np.float32))
    out = np.empty(2, np.float32)
    comp.decode(nan, out)
    assert np.isnan(out).all()


def test_bf16_error_feedback(make):
    comp = make("bf16")
    rng = np.random.default_rng(4)
    res = np.zeros(1000, np.float32)
    g = rng.standard_normal(1000).astype(np.float32)
    p = comp.encode(g, res)
    sent = np.empty_like(g)
    comp.decode(p, sent)
    np.testing.assert_array_equal(sent, (p.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(res, g - sent)  # what was not sent stays in the residual
    assert np.abs(res).max() <= np.abs(g).max() * 2**-8


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16(make, dtype):
    rng = np.random.default_rng(5)
    g = (rng.standard_normal(777) * 3).astype(dtype)
    plain = make("fp16", error_feedback=False)
    res = np.zeros_like(g)
    p = plain.encode(g, res)
    np.testing.assert_array_equal(p, g.astype(np.float16))
    assert not res.any()
    ef = make("fp16")
    res = np.zeros_like(g)
    total_sent = np.zeros_like(g)
    for _ in range(3):
        p = ef.encode(g, res)
        assert p.dtype == np.float16 and p.nbytes == ef.compressed_nbytes(g.size)
        ef.decode(p, total_sent, accumulate=True)
    np.testing.assert_allclose(total_sent + res, 3 * g, rtol=0, atol=1e-12 if dtype == np.float64 else 1e-5)


def test_fp16_saturates_and_keeps_the_excess(make):
    comp = make("fp16")
    g = np.float32([1e5, -7e4, 65504, 1.0])
    res = np.zeros_like(g)
    p = comp.encode(g, res)
    np.testing.assert_array_equal(p, np.float16([65504, -65504, 65504, 1.0]))
    np.testing.assert_array_equal(res, np.float32([1e5 - 65504, -7e4 + 65504, 0, 0]))
    p = comp.encode(np.zeros_like(g), res)
    np.testing.assert_array_equal(p, np.float16([1e5 - 65504, -7e4 + 65504, 0, 0]))
    assert np.isfinite(res).all()


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_a_non_finite_gradient_is_sent_once_and_not_kept(make, name):
    comp = make(name)
    res = np.zeros(3, np.float32)
    comp.encode(np.float32([np.nan, np.inf, 0.5]), res)
    np.testing.assert_array_equal(res, [0, 0, 0])  # 0.5 is exact in both formats
    out = np.zeros(3, np.float32)
    comp.decode(comp.encode(np.float32([1, 1, 1]), res), out)
    np.testing.assert_array_equal(out, [1, 1, 1])  # later steps are clean again
    big = np.full(70_000, np.nan, np.float32)  # the blocked path too
    res = np.zeros_like(big)
    comp.encode(big, res)
    assert not res.any()


def test_bf16_refuses_float64(make):
    with pytest.raises(DTypeMismatchError, match="bf16 compression needs float32"):
        make("bf16").encode(np.zeros(3), np.zeros(3))


def test_topk_sends_the_largest(make):
    comp = make("topk", ratio=0.25)
    g = np.float32([0.1, -5, 0.2, 3, -0.3, 0.05, 4, -0.01])
    res = np.zeros_like(g)
    p = comp.encode(g, res)
    assert comp.k(8) == 2 and p.nbytes == comp.compressed_nbytes(8) == 2 * (4 + 4)
    idx, vals = comp.split_payload(p, 8, np.float32)
    assert list(idx) == [1, 6] and list(vals) == [-5, 4]
    np.testing.assert_array_equal(res, np.float32([0.1, 0, 0.2, 3, -0.3, 0.05, 0, -0.01]))
    out = np.ones(8, np.float32)
    comp.decode(p, out)
    np.testing.assert_array_equal(out, np.float32([0, -5, 0, 0, 0, 0, 4, 0]))
    # next step: the residual's 3 now leads
    p = comp.encode(np.zeros(8, np.float32), res)
    assert list(comp.split_payload(p, 8, np.float32)[0]) == [3, 4]


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_topk_error_feedback_conserves_gradient_mass(make, ratio):
    comp = make("topk", ratio=ratio)
    n = 1000
    rng = np.random.default_rng(int(ratio * 100))
    res = np.zeros(n, np.float64)
    sent = np.zeros(n, np.float64)
    pushed = np.zeros(n, np.float64)
    for _ in range(40):
        g = rng.standard_normal(n)
        pushed += g
        p = comp.encode(g, res)
        assert p.nbytes == comp.compressed_nbytes(n, itemsize=8)
        comp.decode(p, sent, accumulate=True)
        assert np.count_nonzero(res) <= n - comp.k(n)
    np.testing.assert_allclose(sent + res, pushed, rtol=1e-12, atol=1e-12)
    assert abs((sent + res).sum() - pushed.sum()) < 1e-9
    if ratio == 1.0:
        assert not res.any()
