"""A stand-in for cupy on machines without a GPU, strict where cupy is strict, to exercise the
device store's multi-GPU code paths: arrays remember their device; ufuncs refuse operands from
another device or host arrays; kernels (the real CUDA source, compiled as C++) refuse arrays from
another device; cross-device copies go through ``MemoryPointer.copy_from_device`` and are counted.
Only what kvframe uses is here.  Not a cupy replacement: the real thing runs in the gpu tests."""

from __future__ import annotations

import ctypes
import importlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

N_DEVICES = 3
_stack = [0]
stats = {"peer_copies": 0, "kernel_launches": 0}


class Device:
    def __init__(self, device=None):
        self.id = _stack[-1] if device is None else int(device)
        if not 0 <= self.id < N_DEVICES:
            raise RuntimeError(f"no CUDA device {self.id}")

    def __enter__(self):
        _stack.append(self.id)
        return self

    def __exit__(self, *exc):
        _stack.pop()

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class MemoryPointer:
    def __init__(self, arr):
        self.arr = arr
        self.device_id = arr._dev

    def copy_from_device(self, src, size):
        if src.device_id != self.device_id:
            stats["peer_copies"] += 1
        dst = np.ndarray.view(self.arr, np.ndarray).reshape(-1).view(np.uint8)
        dst[:size] = np.ndarray.view(src.arr, np.ndarray).reshape(-1).view(np.uint8)[:size]


class ndarray(np.ndarray):  # noqa: N801 - cupy's name
    def __array_finalize__(self, obj):
        self._dev = getattr(obj, "_dev", _stack[-1])

    @property
    def device(self):
        return Device(self._dev)

    @property
    def data(self):
        return MemoryPointer(self)

    def get(self, stream=None, out=None):
        host = np.array(np.ndarray.view(self, np.ndarray), copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr):
        if not isinstance(arr, np.ndarray) or isinstance(arr, ndarray):
            raise TypeError("set() takes a numpy array")
        np.copyto(np.ndarray.view(self, np.ndarray), arr)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        dev = _stack[-1]
        for x in list(inputs) + list(out or ()):
            if isinstance(x, ndarray):
                if x._dev != dev:
                    raise ValueError(f"array on device {x._dev} used while device {dev} is current")
            elif isinstance(x, np.ndarray) and x.ndim > 0:
                raise TypeError(f"unsupported type {type(x)}: a host array in a device operation")
        plain = [np.ndarray.view(x, np.ndarray) if isinstance(x, ndarray) else x for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(np.ndarray.view(o, np.ndarray) for o in out)
        res = getattr(ufunc, method)(*plain, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(res)

    def __setitem__(self, key, value):
        if isinstance(value, ndarray) and value._dev != self._dev:
            raise ValueError("setitem across devices")
        if isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim > 0:
            raise TypeError("a host array assigned into a device array")
        np.ndarray.__setitem__(self, key, value)


def _wrap(res):
    if isinstance(res, np.ndarray) and not isinstance(res, ndarray):
        out = res.view(ndarray)
        out._dev = _stack[-1]
        return out
    return res


def _check_args(args):
    for a in args:
        if isinstance(a, np.ndarray) and not isinstance(a, ndarray):
            raise TypeError("a host array passed to a device function")
        if isinstance(a, ndarray) and a._dev != _stack[-1]:
            raise ValueError(f"array on device {a._dev} used while device {_stack[-1]} is current")


def empty(shape, dtype=np.float32):
    return _wrap(np.empty(shape, dtype))


def empty_like(a, dtype=None):
    _check_args([a])
    return _wrap(np.empty(a.shape, dtype or a.dtype))


def zeros(shape, dtype=np.float32):
    return _wrap(np.zeros(shape, dtype))


def full(shape, value, dtype=None):
    return _wrap(np.full(shape, value, dtype))


def asarray(x, dtype=None):
    if isinstance(x, ndarray):
        return x if dtype is None else x.astype(dtype)
    return _wrap(np.array(x, dtype=dtype, copy=True))


def asnumpy(x):
    return x.get() if isinstance(x, ndarray) else np.asarray(x)


def ascontiguousarray(x):
    _check_args([x])
    return _wrap(np.ascontiguousarray(np.ndarray.view(x, np.ndarray)))


def copyto(dst, src):
    _check_args([dst, src])
    np.copyto(np.ndarray.view(dst, np.ndarray), np.ndarray.view(src, np.ndarray))


def _passthrough(fn):
    def call(*args, **kwargs):
        _check_args(args)
        plain = [np.ndarray.view(a, np.ndarray) if isinstance(a, ndarray) else a for a in args]
        return _wrap(fn(*plain, **kwargs))

    return call


clip = _passthrough(np.clip)
argpartition = _passthrough(np.argpartition)
arange = _passthrough(np.arange)
isnan = _passthrough(np.isnan)
right_shift = np.right_shift
bitwise_and = np.bitwise_and
abs = _passthrough(np.abs)  # noqa: A001
float16, float32, float64 = np.float16, np.float32, np.float64
uint8, uint16, uint32, int32, int64 = np.uint8, np.uint16, np.uint32, np.int32, np.int64

# kernels: the CUDA source compiled as C++ and run over the grid ------------------------------
_PRELUDE = r"""
struct kvf_dim { unsigned int x; };
static kvf_dim blockIdx, blockDim, threadIdx, gridDim;
#define __global__
#define __restrict__
extern "C" void kvf_set_grid(unsigned b, unsigned t, unsigned bs, unsigned gs) {
    blockIdx.x = b; threadIdx.x = t; blockDim.x = bs; gridDim.x = gs; }
"""
_libs: dict = {}
# argument kinds: p pointer, q long long, f float, i int
_SIGNATURES = {"kvf_encode_2bit": "pppqqf", "kvf_encode_1bit": "pppqqf",
               "kvf_decode_2bit": "ppqfi", "kvf_decode_1bit": "ppqi",
               "kvf_encode_decode_2bit": "pppqfi", "kvf_encode_decode_1bit": "pppqfi"}


class _Function:
    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __call__(self, grid, block, args):
        _check_args(args)
        stats["kernel_launches"] += 1
        fn = getattr(self.lib, self.name)
        c_args = []
        if len(args) != len(_SIGNATURES[self.name]):
            raise TypeError(f"{self.name} takes {len(_SIGNATURES[self.name])} arguments; got {len(args)}")
        for kind, a in zip(_SIGNATURES[self.name], args):
            if kind == "p":
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            elif kind == "q":
                c_args.append(ctypes.c_longlong(int(a)))
            elif kind == "f":
                c_args.append(ctypes.c_float(float(a)))
            else:
                c_args.append(ctypes.c_int(int(a)))
        # a small grid-stride simulation: the real grid would be far wider, the loops cover it
        g, b = min(grid[0], 3), min(block[0], 4)
        for bb in range(g):
            for tt in range(b):
                self.lib.kvf_set_grid(bb, tt, b, g)
                fn(*c_args)


class RawModule:
    def __init__(self, code, options=()):
        key = code
        if key not in _libs:
            cxx = shutil.which("c++") or shutil.which("g++")
            d = Path(tempfile.mkdtemp(prefix="fake_cupy_"))
            (d / "k.cpp").write_text(_PRELUDE + code)
            subprocess.run([cxx, "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(d / "k.so"),
                            str(d / "k.cpp")], check=True, capture_output=True, timeout=120)
            _libs[key] = ctypes.CDLL(str(d / "k.so"))
        self.lib = _libs[key]

    def get_function(self, name):
        return _Function(self.lib, name)


class _Stream:
    def synchronize(self):
        pass


class _Runtime:
    @staticmethod
    def getDeviceCount():  # noqa: N802 - cupy's name
        return N_DEVICES

    @staticmethod
    def deviceCanAccessPeer(a, b):  # noqa: N802
        return 1

    @staticmethod
    def deviceEnablePeerAccess(peer):  # noqa: N802
        return None


cuda = SimpleNamespace(Device=Device, runtime=_Runtime(), get_current_stream=lambda: _Stream())


def install(monkeypatch):
    """Make this module `cupy` for one test.  kvframe_compressors._cuda (which binds cupy at import)
    is imported afresh under it, and put back as it was (absent, or bound to the real cupy) after."""
    import kvframe_compressors

    monkeypatch.setitem(sys.modules, "cupy", sys.modules[__name__])
    monkeypatch.setitem(sys.modules, "kvframe_compressors._cuda", None)
    monkeypatch.setattr(kvframe_compressors, "_cuda", None, raising=False)
    del sys.modules["kvframe_compressors._cuda"]
    delattr(kvframe_compressors, "_cuda")
    importlib.import_module("kvframe_compressors._cuda")  # bound to this module until teardown
    stats.update(peer_copies=0, kernel_launches=0)


def __getattr__(name):
    """Anything else numpy has: ufuncs (device-checked through ndarray.__array_ufunc__), dtypes,
    and functions wrapped to keep results on the current device."""
    obj = getattr(np, name)
    if isinstance(obj, (np.ufunc, type)) or not callable(obj):
        return obj
    return _passthrough(obj)
