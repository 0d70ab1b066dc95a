"""Plain-Python reference quantizers, written from MXNet's documented semantics, one element at a
time in float32 scalars.  Slow on purpose: they share no code with kvframe_compressors."""

import numpy as np

F32 = np.float32


def quantize_2bit(grad, residual, threshold):
    """Returns the payload bytes (4 * ceil(n / 16)); updates ``residual`` (a list of np.float32)."""
    t = F32(threshold)
    n = len(grad)
    out = bytearray(4 * ((n + 15) // 16))
    for i in range(n):
        r = F32(residual[i] + F32(grad[i]))
        if r >= t:
            code = 0b11
            r = F32(r - t)
        elif r <= -t:
            code = 0b10
            r = F32(r - F32(-t))
        else:
            code = 0
        residual[i] = r
        out[i // 4] |= code << (6 - 2 * (i % 4))
    return bytes(out)


def dequantize_2bit(payload, n, threshold):
    t = F32(threshold)
    vals = []
    for i in range(n):
        code = (payload[i // 4] >> (6 - 2 * (i % 4))) & 0b11
        vals.append(t if code == 0b11 else (F32(-t) if code == 0b10 else F32(0)))
    return np.array(vals, np.float32)


def quantize_1bit(grad, residual, threshold):
    t = F32(threshold)
    n = len(grad)
    out = bytearray(4 * ((n + 31) // 32))
    for i in range(n):
        r = F32(residual[i] + F32(grad[i]))
        if r > t:
            out[i // 8] |= 0x80 >> (i % 8)
            r = F32(r - F32(1))
        else:
            r = F32(r + F32(1))
        residual[i] = r
    return bytes(out)


def dequantize_1bit(payload, n):
    return np.array([F32(1) if (payload[i // 8] >> (7 - i % 8)) & 1 else F32(-1) for i in range(n)], np.float32)
