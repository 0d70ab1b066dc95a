"""Compressor 'scaledsign': sends one float32 scale (the mean magnitude) and one sign byte per
value, with error feedback.  What a third party writes to add a compressor."""

from typing import Literal

import numpy as np
from pydantic import Field

import kvframe
from kvframe.config import CompressionConfig


class ScaledSignConfig(CompressionConfig):
    type: Literal["scaledsign"] = "scaledsign"
    min_scale: float = Field(0.0, ge=0)


class ScaledSign:
    def __init__(self, config):
        self.config = config

    def compressed_nbytes(self, size):
        return 4 + size

    def encode(self, grad, residual):
        r = residual.reshape(-1)
        r += grad.reshape(-1)
        scale = np.float32(max(float(np.abs(r).mean()) if r.size else 0.0, self.config.min_scale))
        signs = np.where(r >= 0, 1, -1).astype(np.int8)
        r -= signs * scale
        payload = np.empty(4 + r.size, np.uint8)
        payload[:4].view(np.float32)[0] = scale
        payload[4:] = signs.view(np.uint8)
        return payload

    def decode(self, payload, out, accumulate=False):
        scale = payload[:4].view(np.float32)[0]
        vals = (payload[4:].view(np.int8) * scale).astype(out.dtype).reshape(out.shape)
        if accumulate:
            out += vals
        else:
            out[...] = vals
        return out


@kvframe.hookimpl
def kvframe_register_compressors(register):
    register("scaledsign", ScaledSign, ScaledSignConfig)
