"""Copies between numpy arrays and cupy arrays on any GPU (peer copies between GPUs)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvframe.arrays import array_module

_peer_done: set = set()


def device_id(x: Any) -> int | None:
    """The CUDA device of a cupy array, None for host arrays."""
    return None if array_module(x) is np else x.device.id


def enable_peer_access(ids: list[int]) -> None:
    """Let every pair of these GPUs copy directly where the hardware allows (once per pair)."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return
    for a in ids:
        for b in ids:
            if a == b or (a, b) in _peer_done:
                continue
            _peer_done.add((a, b))
            try:
                if cupy.cuda.runtime.deviceCanAccessPeer(a, b):
                    with cupy.cuda.Device(a):
                        cupy.cuda.runtime.deviceEnablePeerAccess(b)
            except Exception:  # already enabled, or not possible: copies then go through the host
                pass


def empty_on(dev: int | None, shape: tuple, dtype: Any) -> Any:
    if dev is None:
        return np.empty(shape, dtype)
    import cupy

    with cupy.cuda.Device(dev):
        return cupy.empty(shape, dtype)


def zeros_on(dev: int | None, shape: tuple, dtype: Any) -> Any:
    if dev is None:
        return np.zeros(shape, dtype)
    import cupy

    with cupy.cuda.Device(dev):
        return cupy.zeros(shape, dtype)


def copy_into(dst: Any, src: Any) -> Any:
    """dst[...] = src across host and devices. Returns dst."""
    if dst is src:
        return dst
    ds, ss = device_id(dst), device_id(src)
    if ds is None and ss is None:
        np.copyto(dst, src)
        return dst
    import cupy

    if ds is None:  # device -> host
        if dst.flags.c_contiguous and src.flags.c_contiguous:
            with src.device:
                src.get(out=dst)
        else:
            dst[...] = cupy.asnumpy(src)
        return dst
    with dst.device:
        if ss is None:  # host -> device
            if dst.flags.c_contiguous:
                dst.set(np.ascontiguousarray(src, dtype=dst.dtype).reshape(dst.shape))
            else:
                dst[...] = cupy.asarray(src)
        elif ss == ds:
            cupy.copyto(dst, src)
        else:  # GPU -> GPU: finish the source's pending work, then a peer copy
            with src.device:
                cupy.cuda.get_current_stream().synchronize()
                s = src if src.flags.c_contiguous else cupy.ascontiguousarray(src)
            if dst.flags.c_contiguous:
                dst.data.copy_from_device(s.data, s.nbytes)
            else:
                tmp = cupy.empty(s.shape, s.dtype)
                tmp.data.copy_from_device(s.data, s.nbytes)
                dst[...] = tmp
    return dst


def to_device(x: Any, dev: int | None) -> Any:
    """``x`` itself when it already sits on ``dev`` (None: host), else a copy there."""
    if device_id(x) == dev:
        return x
    out = empty_on(dev, x.shape, x.dtype)
    return copy_into(out, x)
