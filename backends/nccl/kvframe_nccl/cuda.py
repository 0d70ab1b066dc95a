"""Finding cupy, NCCL and a GPU, with errors that say which is missing and how to get it;
NCCL dtype codes; converting NCCL unique ids to and from raw bytes.

Nothing here imports cupy at module import time, so ``kvframe_nccl`` imports everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from kvframe.errors import KVFrameError

ID_BYTES = 128

# NCCL's ncclDataType_t codes (nccl.h), the same numbers cupy.cuda.nccl exports as NCCL_*.
NCCL_DTYPE_CODES = {
    "int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
    "float16": 6, "float32": 7, "float64": 8, "bfloat16": 9,
}
NCCL_SUM = 0
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class NcclUnavailableError(KVFrameError, RuntimeError):
    """Store 'nccl' cannot start here: cupy, NCCL or a GPU is missing. The message says which."""


def cuda_extra() -> str:
    """The extra matching the installed cupy wheel ('cuda12' / 'cuda13'), or both spelled out."""
    for dist, extra in (("cupy-cuda13x", "cuda13"), ("cupy-cuda12x", "cuda12")):
        try:
            metadata.version(dist)
            return extra
        except metadata.PackageNotFoundError:
            continue
    return ""


def install_hint(extra: str | None = None) -> str:
    extra = cuda_extra() if extra is None else extra
    if extra:
        return f"pip install 'kvframe-nccl[{extra}]'"
    return ("pip install 'kvframe-nccl[cuda12]' (CUDA 12 driver) or pip install 'kvframe-nccl[cuda13]' "
            "(CUDA 13 driver); `nvidia-smi` shows the driver's CUDA version")


@dataclass(frozen=True)
class CudaStack:
    cupy: Any
    nccl: Any
    device_count: int


def _nccl_package(extra: str) -> str:
    known = {"cuda12": "nvidia-nccl-cu12", "cuda13": "nvidia-nccl-cu13"}
    return known.get(extra, "nvidia-nccl-cu12 or nvidia-nccl-cu13")


def require() -> CudaStack:
    """cupy, cupy.cuda.nccl and the number of GPUs; or NcclUnavailableError naming every missing piece."""
    if importlib.util.find_spec("cupy") is None:
        raise NcclUnavailableError(
            "store 'nccl' needs cupy, which is not installed. Install the GPU stack with "
            f"{install_hint('')}. The other stores ('local', 'device', ...) work without it.")
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:
        raise NcclUnavailableError(
            f"store 'nccl' needs cupy, which is installed but failed to import ({type(exc).__name__}: {exc}). "
            f"Reinstall it with {install_hint()}") from exc
    extra = cuda_extra()
    missing: list[str] = []
    nccl = None
    try:
        nccl = importlib.import_module("cupy.cuda.nccl")
        if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
            missing.append(f"the NCCL library (cupy cannot load libnccl): pip install {_nccl_package(extra)}, "
                           f"or {install_hint(extra)}")
    except Exception as exc:
        missing.append(f"the NCCL library (importing cupy.cuda.nccl failed: {type(exc).__name__}: {exc}): "
                       f"pip install {_nccl_package(extra)}, or {install_hint(extra)}")
    count = 0
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
        if count == 0:
            missing.append("a GPU (cupy sees no CUDA device; check CUDA_VISIBLE_DEVICES and `nvidia-smi`)")
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        hint = ""
        if "InsufficientDriver" in reason:
            hint = ("; the driver is missing or older than this cupy's CUDA: install the cupy wheel for the driver's "
                    "CUDA version (`nvidia-smi` shows it), e.g. 'kvframe-nccl[cuda12]'")
        missing.append(f"a GPU (cupy found no usable CUDA device: {reason}{hint})")
    if missing:
        raise NcclUnavailableError("store 'nccl' cannot start: missing " + "; and ".join(missing) +
                                   ". The other stores ('local', 'device', ...) work without it.")
    return CudaStack(cupy, nccl, count)


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def nccl_dtype(dtype: Any, nccl: Any = None) -> int:
    """NCCL's code for ``dtype``; raises TypeError for one NCCL cannot sum."""
    name = dtype_name(dtype)
    code = NCCL_DTYPE_CODES.get(name)
    if code is None:
        raise TypeError(f"store 'nccl' sums {', '.join(FLOAT_DTYPES)} and the integer types "
                        f"{', '.join(n for n in NCCL_DTYPE_CODES if n not in FLOAT_DTYPES)}; got dtype {name}")
    if nccl is not None:
        attr = f"NCCL_{name.upper()}"
        code = getattr(nccl, attr, code)
        if name == "bfloat16" and not hasattr(nccl, attr):
            raise TypeError("this cupy's NCCL bindings have no NCCL_BFLOAT16 (needs NCCL >= 2.10 and a recent cupy)")
    return code


def uid_to_bytes(uid: Any) -> bytes:
    """cupy's unique id (bytes since cupy 14, a tuple of 128 signed chars before) as 128 raw bytes."""
    if isinstance(uid, (bytes, bytearray, memoryview)):
        raw = bytes(uid)
    else:
        vals = [int(v) for v in uid]
        if any(not -128 <= v <= 255 for v in vals):
            raise ValueError("an NCCL unique id holds byte values (-128..255)")
        raw = bytes(v & 0xFF for v in vals)
    if len(raw) != ID_BYTES:
        raise ValueError(f"an NCCL unique id has {ID_BYTES} bytes; got {len(raw)}")
    return raw


def uid_for_cupy(raw: bytes, cupy_version: str | None = None) -> Any:
    """Raw id bytes in the form this cupy's NcclCommunicator takes: bytes (cupy >= 14) or a tuple of
    signed ints (older)."""
    if len(raw) != ID_BYTES:
        raise ValueError(f"an NCCL unique id has {ID_BYTES} bytes; got {len(raw)}")
    if cupy_version is None:
        cupy = sys.modules.get("cupy")
        cupy_version = getattr(cupy, "__version__", "14")
    try:
        major = int(str(cupy_version).split(".")[0])
    except ValueError:
        major = 14
    if major >= 14:
        return bytes(raw)
    return tuple(b - 256 if b > 127 else b for b in raw)


__all__ = ["NcclUnavailableError", "CudaStack", "require", "nccl_dtype", "uid_to_bytes", "uid_for_cupy",
           "install_hint", "NCCL_DTYPE_CODES"]
