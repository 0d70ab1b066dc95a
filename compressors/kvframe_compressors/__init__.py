"""kvframe plugin: gradient compressors '2bit', '1bit' (MXNet's, bit-identical), 'fp16', 'bf16'
and 'topk'.  Each is a :class:`kvframe.protocols.Compressor` with a pydantic config.

``kernel_backend()`` says whether the 2bit/1bit CPU codecs run compiled numba kernels or numpy
(``KVFRAME_KERNELS=numba|numpy``; both give the same bits); ``set_kernel_backend(name)`` switches."""

from kvframe import hookimpl
from kvframe_compressors._kernels import backend as kernel_backend
from kvframe_compressors._kernels import set_backend as set_kernel_backend
from kvframe_compressors.base import BaseCompressor
from kvframe_compressors.cast import BF16, FP16
from kvframe_compressors.configs import BF16Config, FP16Config, OneBitConfig, TopKConfig, TwoBitConfig
from kvframe_compressors.quantize import OneBit, TwoBit
from kvframe_compressors.topk import TopK

COMPRESSORS = {
    "2bit": (TwoBit, TwoBitConfig),
    "1bit": (OneBit, OneBitConfig),
    "fp16": (FP16, FP16Config),
    "bf16": (BF16, BF16Config),
    "topk": (TopK, TopKConfig),
}


@hookimpl
def kvframe_register_compressors(register):
    for name, (cls, model) in COMPRESSORS.items():
        register(name, cls, model)


__all__ = ["BaseCompressor", "TwoBit", "OneBit", "FP16", "BF16", "TopK", "TwoBitConfig", "OneBitConfig",
           "FP16Config", "BF16Config", "TopKConfig", "COMPRESSORS", "kernel_backend", "set_kernel_backend"]
