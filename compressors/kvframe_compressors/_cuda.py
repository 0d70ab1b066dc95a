"""CUDA kernels (through cupy) for the '2bit' and '1bit' codecs, bit-identical to the CPU path.

Each encode thread owns one payload byte (4 or 8 values), so no atomics are needed; decode runs
one thread per value.  Only float32 additions, subtractions and comparisons are used, in the same
order as the CPU code, so results match bit for bit (no fused multiply-add can occur).
"""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from kvframe_compressors._cuda_source import SOURCE as _SOURCE

_modules: dict = {}
_THREADS = 256


def _kernel(name: str) -> Any:
    """The kernel compiled for the current device (one module per device)."""
    dev = cupy.cuda.Device().id
    module = _modules.get(dev)
    if module is None:
        # no fast-math, no contraction: plain IEEE float32 arithmetic, as on the CPU
        module = _modules[dev] = cupy.RawModule(code=_SOURCE, options=("--fmad=false",))
    return module.get_function(name)


def _grid(count: int) -> tuple[int]:
    return (max(1, min(65535 * 8, -(-count // _THREADS))),)


def _contig(x: Any) -> Any:
    return x if x.flags.c_contiguous else cupy.ascontiguousarray(x)


def _check_residual(residual: Any) -> Any:
    if not residual.flags.c_contiguous:
        raise ValueError("the residual must be a C-contiguous array (it is updated in place)")
    return residual


def _same_device(a: Any, b: Any, what: str) -> None:
    if a.device.id != b.device.id:
        raise ValueError(f"{what} must be on the same GPU: got devices {a.device.id} and {b.device.id}")


def _encode(name: str, grad: Any, residual: Any, t: np.float32, nbytes: int) -> Any:
    r = _check_residual(residual)
    _same_device(grad, residual, "the gradient and its residual")
    with grad.device:
        g = _contig(grad)
        out = cupy.empty(nbytes, cupy.uint8)
        if nbytes:
            _kernel(name)(_grid(nbytes), (_THREADS,), (g, r, out, np.int64(g.size), np.int64(nbytes), np.float32(t)))
        return out


def encode_2bit(grad: Any, residual: Any, t: np.float32, nbytes: int) -> Any:
    return _encode("kvf_encode_2bit", grad, residual, t, nbytes)


def encode_1bit(grad: Any, residual: Any, t: np.float32, nbytes: int) -> Any:
    return _encode("kvf_encode_1bit", grad, residual, t, nbytes)


def _decode(payload: Any, out: Any, launch) -> Any:
    _same_device(payload, out, "the payload and the output")
    with out.device:
        target = out if out.flags.c_contiguous else cupy.ascontiguousarray(out)
        if target.size:
            launch(target)
        if target is not out:
            out[...] = target
        return out


def decode_2bit(payload: Any, out: Any, t: np.float32, accumulate: bool) -> Any:
    def launch(o: Any) -> None:
        _kernel("kvf_decode_2bit")(_grid(o.size), (_THREADS,),
                                   (_contig(payload), o, np.int64(o.size), np.float32(t), np.int32(accumulate)))

    return _decode(payload, out, launch)


def decode_1bit(payload: Any, out: Any, accumulate: bool) -> Any:
    def launch(o: Any) -> None:
        _kernel("kvf_decode_1bit")(_grid(o.size), (_THREADS,),
                                   (_contig(payload), o, np.int64(o.size), np.int32(accumulate)))

    return _decode(payload, out, launch)


def _encode_decode(name: str, grad: Any, residual: Any, out: Any, t: np.float32, accumulate: bool) -> Any:
    """``out (+)= decode(encode(grad, residual))`` in one kernel, without a payload."""
    r = _check_residual(residual)
    _same_device(grad, residual, "the gradient and its residual")
    _same_device(grad, out, "the gradient and the output")
    with grad.device:
        g = _contig(grad)
        target = out if out.flags.c_contiguous else (cupy.ascontiguousarray(out) if accumulate else
                                                     cupy.empty(out.shape, out.dtype))
        if g.size:
            _kernel(name)(_grid(g.size), (_THREADS,),
                          (g, r, target, np.int64(g.size), np.float32(t), np.int32(bool(accumulate))))
        if target is not out:
            out[...] = target
        return out


def encode_decode_2bit(grad: Any, residual: Any, out: Any, t: np.float32, accumulate: bool) -> Any:
    return _encode_decode("kvf_encode_decode_2bit", grad, residual, out, t, accumulate)


def encode_decode_1bit(grad: Any, residual: Any, out: Any, t: np.float32, accumulate: bool) -> Any:
    return _encode_decode("kvf_encode_decode_1bit", grad, residual, out, t, accumulate)
