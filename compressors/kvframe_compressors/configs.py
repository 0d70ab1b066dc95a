"""Validated configs of the built-in compressors (``set_gradient_compression`` dicts)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from kvframe.config import CompressionConfig

RMS_THRESHOLD = 1.0  # the default threshold of threshold_scale='rms', in RMS units (see TwoBitConfig)


class TwoBitConfig(CompressionConfig):
    """MXNet's 2-bit compression: values become +threshold, -threshold or 0; the rest is carried
    over in a per-device residual.

    ``threshold_scale='absolute'`` (MXNet's) takes ``threshold`` in the gradient's own units, so a
    good value depends on the model, the loss and the batch. ``'rms'`` makes it scale-free: the
    threshold of each push is ``threshold`` times the root-mean-square of that key's
    residual-corrected gradient (per shard in dist stores), and travels in front of the codes;
    the default (1.0) needs no tuning. Arrays of fewer than ``raw_below`` elements (biases,
    metrics) then travel uncompressed, exactly.
    """

    type: Literal["2bit"] = "2bit"
    threshold: float = Field(0.5, gt=0, allow_inf_nan=False,
                             description="quantisation threshold t > 0: a residual >= t sends +t, <= -t sends -t "
                                         "(threshold_scale='rms': in units of the RMS of each push; default "
                                         f"{RMS_THRESHOLD} there)")
    threshold_scale: Literal["absolute", "rms"] = Field(
        "absolute", description="'absolute': threshold in gradient units (MXNet's). 'rms': a multiple of the RMS of "
                                "each key's residual-corrected gradient, per push (scale-free)")
    raw_below: int = Field(256, ge=0, description="threshold_scale='rms': arrays of fewer elements are sent "
                                                  "uncompressed (exact); 0: none. Ignored by 'absolute'")

    @field_validator("threshold")
    @classmethod
    def _float32_positive(cls, v: float) -> float:
        if not (np.float32(v) > 0 and math.isfinite(np.float32(v))):
            raise ValueError(f"threshold must be a positive, finite float32; {v!r} is not one after rounding")
        return v

    @model_validator(mode="after")
    def _rms_default(self):
        if self.threshold_scale == "rms" and "threshold" not in self.model_fields_set:
            self.threshold = RMS_THRESHOLD
        return self


class OneBitConfig(CompressionConfig):
    """MXNet 2.0's 1-bit compression: a residual above the threshold sends +1, otherwise -1."""

    type: Literal["1bit"] = "1bit"
    threshold: float = Field(0.0, allow_inf_nan=False,
                             description="residual > threshold sends +1, otherwise -1 (any finite float)")

    @field_validator("threshold")
    @classmethod
    def _float32_finite(cls, v: float) -> float:
        if not math.isfinite(np.float32(v)):
            raise ValueError(f"threshold must be a finite float32; {v!r} overflows")
        return v


class FP16Config(CompressionConfig):
    """Send gradients as IEEE half precision."""

    type: Literal["fp16"] = "fp16"
    error_feedback: bool = Field(True, description="keep the rounding error in the residual and send it later")


class BF16Config(CompressionConfig):
    """Send gradients as bfloat16 (float32's exponent, 8 bits of mantissa; round to nearest even)."""

    type: Literal["bf16"] = "bf16"
    error_feedback: bool = Field(True, description="keep the rounding error in the residual and send it later")


class TopKConfig(CompressionConfig):
    """Send only the largest-magnitude fraction ``ratio`` of the (residual-corrected) gradient."""

    type: Literal["topk"] = "topk"
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of the elements sent each step, in (0, 1]")
