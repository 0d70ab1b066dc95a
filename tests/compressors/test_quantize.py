"""2bit and 1bit against the plain-Python reference: payload bytes, residuals, decoded values."""

import numpy as np
import pytest
from kvframe_compressors import _blocks
from mxnet_reference import dequantize_1bit, dequantize_2bit, quantize_1bit, quantize_2bit

from kvframe.errors import DTypeMismatchError

SIZES = [1, 3, 4, 15, 16, 17, 31, 33, 100, 1029]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("threshold", [0.5, 0.1, 1.7])
def test_2bit_matches_reference_over_steps(make, n, threshold):
    comp = make("2bit", threshold=threshold)
    rng = np.random.default_rng(n)
    res = np.zeros(n, np.float32)
    ref_res = [np.float32(0)] * n
    steps = 12 if n < 1000 else 3
    for _ in range(steps):
        g = (rng.standard_normal(n) * threshold).astype(np.float32)
        g[::5], g[2::5] = np.float32(threshold), np.float32(threshold) / 2  # exactly on the threshold
        g[3::7] = -np.float32(threshold)
        payload = comp.encode(g, res)
        want = quantize_2bit(list(g), ref_res, threshold)
        assert payload.dtype == np.uint8 and payload.tobytes() == want
        assert payload.nbytes == comp.compressed_nbytes(n) == 4 * -(-n // 16)
        np.testing.assert_array_equal(res, np.array(ref_res, np.float32))
        out = np.full(n, 7, np.float32)
        comp.decode(payload, out)
        np.testing.assert_array_equal(out, dequantize_2bit(want, n, threshold))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.5])
def test_1bit_matches_reference_over_steps(make, n, threshold):
    comp = make("1bit", threshold=threshold)
    rng = np.random.default_rng(100 + n)
    res = np.zeros(n, np.float32)
    ref_res = [np.float32(0)] * n
    for _ in range(10 if n < 1000 else 3):
        g = rng.standard_normal(n).astype(np.float32)
        g[::3] = np.float32(threshold) - res[::3]  # residuals land exactly on the threshold
        payload = comp.encode(g, res)
        want = quantize_1bit(list(g), ref_res, threshold)
        assert payload.tobytes() == want
        assert payload.nbytes == comp.compressed_nbytes(n) == 4 * -(-n // 32)
        np.testing.assert_array_equal(res, np.array(ref_res, np.float32))
        out = np.zeros(n, np.float32)
        comp.decode(payload, out)
        np.testing.assert_array_equal(out, dequantize_1bit(want, n))


def test_1bit_thresholds_decide_the_sign(make):
    g = np.array([-0.6, -0.5, -0.2, 0.0, 0.3, 0.5, 0.7], np.float32)
    expect = {  # r > t -> +1 (residual r - 1), else -1 (residual r + 1)
        -0.5: [-1, -1, 1, 1, 1, 1, 1],
        0.0: [-1, -1, -1, -1, 1, 1, 1],
        0.5: [-1, -1, -1, -1, -1, -1, 1],
    }
    for t, signs in expect.items():
        comp = make("1bit", threshold=t)
        res = np.zeros_like(g)
        out = np.empty_like(g)
        comp.decode(comp.encode(g, res), out)
        np.testing.assert_array_equal(out, np.array(signs, np.float32))
        np.testing.assert_array_equal(res, g - np.array(signs, np.float32))


def test_2bit_byte_layout(make):
    t = 0.5
    # value j of a word lies in byte j >> 2, bits 7-6 / 5-4 / 3-2 / 1-0; 11 = +t, 10 = -t
    g = np.zeros(20, np.float32)
    g[0] = 1.0  # +t -> byte 0, 0xc0
    g[5] = -1.0  # -t -> byte 1, mask 0x30 holds 10 -> 0x20
    g[10] = 0.7  # +t -> byte 2, mask 0x0c -> 0x0c
    g[15] = -0.5  # -t (<= -t) -> byte 3, mask 0x03 holds 10 -> 0x02
    g[16] = 0.49  # stays in the residual
    g[19] = 0.5  # +t -> word 1, byte 4, mask 0x03 -> 0x03
    comp = make("2bit", threshold=t)
    res = np.zeros(20, np.float32)
    p = comp.encode(g, res)
    assert list(p) == [0xC0, 0x20, 0x0C, 0x02, 0x03, 0, 0, 0]
    assert p.view(np.float32).shape == (2,)  # MXNet's compressed array: ceil(20 / 16) float32 words
    left = np.float32(0.7) - np.float32(0.5)
    np.testing.assert_array_equal(res[[0, 5, 10, 15, 16, 19]], np.float32([0.5, -0.5, left, 0, 0.49, 0]))
    out = np.empty(20, np.float32)
    comp.decode(p.view(np.float32), out)  # MXNet's float32 words decode the same
    np.testing.assert_array_equal(out[[0, 5, 10, 15, 16, 19]], np.float32([t, -t, t, -t, 0, t]))
    assert np.count_nonzero(out) == 5


def test_2bit_code_01_decodes_to_zero(make):
    comp = make("2bit", threshold=0.25)
    out = np.ones(4, np.float32)
    comp.decode(np.array([0b01_11_10_01, 0, 0, 0], np.uint8), out)
    np.testing.assert_array_equal(out, np.float32([0, 0.25, -0.25, 0]))


def test_1bit_byte_layout_msb_first(make):
    comp = make("1bit", threshold=0)
    g = -np.ones(40, np.float32)
    g[[0, 9, 31, 32, 39]] = 1
    p = comp.encode(g, np.zeros(40, np.float32))
    assert list(p) == [0x80, 0x40, 0, 0x01, 0x81, 0, 0, 0]
    assert p.view(np.float32).shape == (2,)


def _vector_2bit(g, r, t):
    """An independent whole-array formulation (np.where and explicit shifts, no packbits)."""
    r += g
    pos, neg = r >= t, r <= -t
    r[pos] -= t
    r[neg] -= np.float32(-t)
    codes = np.where(pos, 3, np.where(neg, 2, 0)).astype(np.uint8)
    codes = np.concatenate([codes, np.zeros(-len(codes) % 16, np.uint8)]).reshape(-1, 4)
    return (codes[:, 0] << 6 | codes[:, 1] << 4 | codes[:, 2] << 2 | codes[:, 3]).astype(np.uint8)


def test_2bit_large_threaded_equals_whole_array_formula(make, monkeypatch):
    monkeypatch.setattr(_blocks, "PARALLEL_MIN", 1 << 16)
    n = 5 * _blocks.BLOCK + 7  # several blocks over the pool, and a ragged tail
    comp = make("2bit", threshold=0.3)
    rng = np.random.default_rng(0)
    res, ref = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for _ in range(3):
        g = (rng.standard_normal(n) * 0.3).astype(np.float32)
        p = comp.encode(g, res)
        np.testing.assert_array_equal(p, _vector_2bit(g, ref, np.float32(0.3)))
        np.testing.assert_array_equal(res, ref)
    out = np.ones(n, np.float32)
    comp.decode(p, out, accumulate=True)
    codes = np.unpackbits(p).reshape(-1, 2)[:n]
    want = np.where(codes[:, 0] == 0, 0, np.where(codes[:, 1] == 1, np.float32(0.3), np.float32(-0.3)))
    np.testing.assert_array_equal(out, (1 + want).astype(np.float32))


def test_accumulate_and_non_contiguous(make):
    comp = make("2bit", threshold=0.5)
    g = np.arange(-16, 16, dtype=np.float32).reshape(4, 8) / 10
    p = comp.encode(g.T, np.zeros(32, np.float32))  # a non-contiguous gradient is read in C order of .T
    ref_res = [np.float32(0)] * 32
    assert p.tobytes() == quantize_2bit(list(g.T.reshape(-1)), ref_res, 0.5)
    base = np.ones((8, 8), np.float32)
    view = base[:, :4]  # non-contiguous output
    comp.decode(p, view, accumulate=True)
    np.testing.assert_array_equal(view.reshape(-1), 1 + dequantize_2bit(p.tobytes(), 32, 0.5))
    np.testing.assert_array_equal(base[:, 4:], 1)


@pytest.mark.parametrize("name", ["2bit", "1bit"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_quantizers_need_float32(make, name, dtype):
    comp = make(name)
    g = np.zeros(8, dtype)
    with pytest.raises(DTypeMismatchError, match=f"{name} compression needs float32.*{np.dtype(dtype)}"):
        comp.encode(g, np.zeros(8, dtype))


def test_residual_must_match(make):
    comp = make("2bit")
    with pytest.raises(ValueError, match="residual has 4 elements"):
        comp.encode(np.zeros(8, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        comp.encode(np.zeros(8, np.float32), np.zeros(16, np.float32)[::2])
    with pytest.raises(ValueError, match="has 4 bytes; got 8"):
        comp.decode(np.zeros(8, np.uint8), np.zeros(8, np.float32))


def test_ratios(make):
    assert make("2bit").compression_ratio(1 << 20) == 16
    assert make("1bit").compression_ratio(1 << 20) == 32
    assert make("fp16").compression_ratio(1000) == 2
    assert make("bf16").compression_ratio(1000) == 2
    assert make("topk", ratio=0.01).compressed_nbytes(1000) == 10 * 8


def test_1bit_large_threaded_equals_whole_array_formula(make, monkeypatch):
    monkeypatch.setattr(_blocks, "PARALLEL_MIN", 1 << 16)
    n = 4 * _blocks.BLOCK + 13
    comp = make("1bit", threshold=0.1)
    rng = np.random.default_rng(1)
    res, ref = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        p = comp.encode(g, res)
        ref += g
        bits = ref > np.float32(0.1)
        ref[bits] -= np.float32(1)
        ref[~bits] += np.float32(1)
        padded = np.concatenate([bits, np.zeros(-n % 32, bool)]).reshape(-1, 8).astype(np.uint8)
        want = np.zeros(len(padded), np.uint8)
        for j in range(8):
            want |= padded[:, j] << (7 - j)
        np.testing.assert_array_equal(p, want)
        np.testing.assert_array_equal(res, ref)
    out = np.zeros(n, np.float32)
    comp.decode(p, out)
    np.testing.assert_array_equal(out, np.where(bits, np.float32(1), np.float32(-1)))


def test_every_compressor_is_listed_and_sizes_match(make):
    from kvframe import plugins

    assert {"2bit", "1bit", "fp16", "bf16", "topk"} <= set(plugins.names("compressors"))
    g = np.random.default_rng(2).standard_normal(1001).astype(np.float32)
    for name in ["2bit", "1bit", "fp16", "bf16", "topk"]:
        comp = make(name)
        assert comp.config.type == name
        p = comp.encode(g, np.zeros_like(g))
        assert p.nbytes == comp.compressed_nbytes(g.size), name
        assert p.nbytes < g.nbytes
