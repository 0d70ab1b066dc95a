"""A CPU stand-in for the parts of cupy and cupy.cuda.nccl that store 'nccl' uses.

It lets the store's logic (per-device placement, buckets, NCCL groups, reduce/broadcast/all-reduce
choices, the updater, multi-process mode over the real TCP rendezvous with threads as processes)
run in CI without a GPU. Arrays are numpy arrays tagged with a device id; NCCL collectives are
queued inside groupStart/groupEnd and executed at groupEnd on raw memory through the pointers the
store passes, the way NCCL sees them, after checking that every rank of a communicator issued the
same sequence of calls. It proves logic, not GPU behaviour: the gpu-marked tests do that.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
import threading
import types

import numpy as np

_tls = threading.local()
N_DEVICES = 2


def _current() -> int:
    return getattr(_tls, "device", 0)


class FakeArray(np.ndarray):
    """A numpy array that says it lives on GPU ``device.id``."""

    def __array_finalize__(self, obj):
        self._dev = getattr(obj, "_dev", _current())

    @property
    def device(self):
        return Device(self._dev)

    @property
    def data(self):  # cupy's MemoryPointer: .ptr is the first element's address
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self, out=None):
        if out is not None:
            out[...] = self
            return out
        return np.array(self, copy=True).view(np.ndarray)

    def set(self, a):
        self[...] = a

    def copy(self, order="C"):  # cupy copies to the *current* device
        out = np.array(self, copy=True, order=order).view(FakeArray)
        out._dev = _current()
        return out


def _on_current(a: np.ndarray) -> FakeArray:
    out = a.view(FakeArray)
    out._dev = _current()
    return out


class Device:
    def __init__(self, device_id: int = None):
        self.id = _current() if device_id is None else int(device_id)
        if not 0 <= self.id < N_DEVICES:
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id}")
        self._prev: list = []

    def __enter__(self):
        self._prev.append(_current())
        _tls.device = self.id
        return self

    def __exit__(self, *exc):
        _tls.device = self._prev.pop()

    def synchronize(self):
        pass


class Event:
    done = True

    def synchronize(self):
        pass


class Stream:
    def __init__(self, device: int):
        self.device_id = device
        self.ptr = 1000 + device  # fake handle, checked by the fake NCCL

    def record(self, event=None):
        return Event()

    def synchronize(self):
        pass


def get_current_stream():
    return Stream(_current())


def getDeviceCount():
    return N_DEVICES


# array functions: results live on the current device -------------------------------------------
def empty(shape, dtype=np.float32):
    return _on_current(np.empty(shape, dtype))


def zeros(shape, dtype=np.float32):
    return _on_current(np.zeros(shape, dtype))


def array(x, copy=True, dtype=None):
    return _on_current(np.array(np.asarray(x), dtype=dtype, copy=True))


def asarray(x, dtype=None):
    if isinstance(x, FakeArray) and x._dev == _current() and (dtype is None or x.dtype == dtype):
        return x
    return array(x, dtype=dtype)


def ascontiguousarray(x):
    if x.flags.c_contiguous:
        return x
    out = np.ascontiguousarray(x).view(FakeArray)
    out._dev = x._dev
    return out


def add(a, b, out=None):
    return np.add(a, b, out=out)


def concatenate(arrays, axis=0, out=None):
    return np.concatenate(arrays, axis=axis, out=out)


def allclose(a, b, **kw):
    return np.allclose(a, b, **kw)


# NCCL -----------------------------------------------------------------------------------------
NCCL_SUM = 0
_CODES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64, 6: np.float16,
          7: np.float32, 8: np.float64}


try:  # bfloat16 where ml_dtypes is installed (the NCCL code 9)
    import ml_dtypes

    _CODES[9] = ml_dtypes.bfloat16
except ImportError:
    pass


def _memory(ptr: int, count: int, code: int) -> np.ndarray:
    dtype = np.dtype(_CODES[code])
    buf = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=count)


class _Clique:
    def __init__(self, world: int):
        self.world = world
        self.cond = threading.Condition()
        self.pending: dict[int, list] = {}
        self.generation = 0
        self.log: list = []  # executed (op, count) per round, for tests


_cliques: dict[bytes, _Clique] = {}
_cliques_lock = threading.Lock()
stats = {"groups": 0, "calls": 0}


class NcclError(RuntimeError):
    pass


class NcclCommunicator:
    def __init__(self, ndev, commId, rank, _clique=None):
        if _clique is None:
            if not isinstance(commId, bytes) or len(commId) != 128:
                raise NcclError("invalid unique id")
            with _cliques_lock:
                _clique = _cliques.setdefault(commId, _Clique(ndev))
        if _clique.world != ndev:
            raise NcclError(f"world size mismatch: {ndev} vs {_clique.world}")
        self.clique, self.rank, self.dev = _clique, rank, _current()
        self.destroyed = False

    @staticmethod
    def initAll(devices):
        devices = list(range(devices)) if isinstance(devices, int) else list(devices)
        clique = _Clique(len(devices))
        comms = []
        for r, d in enumerate(devices):
            with Device(d):
                comms.append(NcclCommunicator(len(devices), None, r, _clique=clique))
        return comms

    def device_id(self):
        return self.dev

    def _queue(self, op):
        if getattr(_tls, "group", 0) == 0:
            raise NcclError("collective outside groupStart/groupEnd (the store always groups)")
        stream = op[-1]
        if stream != 1000 + self.dev:
            raise NcclError(f"rank {self.rank}: a stream of device {stream - 1000} used with device {self.dev}'s comm")
        _tls.queue.setdefault(id(self.clique), (self.clique, {}))[1].setdefault(self.rank, []).append(op[:-1])
        stats["calls"] += 1

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        self._queue(("allreduce", sendbuf, recvbuf, count, datatype, op, None, stream))

    def reduce(self, sendbuf, recvbuf, count, datatype, op, root, stream):
        self._queue(("reduce", sendbuf, recvbuf, count, datatype, op, root, stream))

    def broadcast(self, sendbuff, recvbuff, count, datatype, root, stream):
        self._queue(("broadcast", sendbuff, recvbuff, count, datatype, None, root, stream))

    def bcast(self, buff, count, datatype, root, stream):
        self.broadcast(buff, buff, count, datatype, root, stream)

    def destroy(self):
        self.destroyed = True

    def abort(self):
        self.destroyed = self.aborted = True


def groupStart():
    if getattr(_tls, "group", 0) == 0:
        _tls.queue = {}
    _tls.group = getattr(_tls, "group", 0) + 1


def groupEnd():
    _tls.group -= 1
    if _tls.group:
        return
    stats["groups"] += 1
    for clique, ops in _tls.queue.values():
        with clique.cond:
            overlap = set(ops) & set(clique.pending)
            if overlap:
                raise NcclError(f"ranks {overlap} posted twice in one round")
            clique.pending.update(ops)
            gen = clique.generation
            if len(clique.pending) == clique.world:
                _execute(clique)
                clique.pending = {}
                clique.generation += 1
                clique.cond.notify_all()
            else:
                if not clique.cond.wait_for(lambda g=gen, c=clique: c.generation != g, timeout=30):
                    raise NcclError("fake NCCL: peers never joined the collective")
    _tls.queue = {}


def _execute(clique: _Clique) -> None:
    ranks = sorted(clique.pending)
    seqs = [clique.pending[r] for r in ranks]
    if len({len(s) for s in seqs}) != 1:
        raise NcclError(f"ranks issued different numbers of collectives: {[len(s) for s in seqs]}")
    for calls in zip(*seqs):
        kinds = {(c[0], c[3], c[4], c[6]) for c in calls}
        if len(kinds) != 1:
            raise NcclError(f"mismatched collectives across ranks: {kinds}")
        kind, _, _, count, code, _, root = calls[0]
        clique.log.append((kind, count))
        if kind == "broadcast":
            value = _memory(calls[root][1], count, code).copy()
            for c in calls:
                _memory(c[2], count, code)[...] = value
            continue
        total = sum(_memory(c[1], count, code).astype(np.float64 if np.dtype(_CODES[code]).kind == "f" else
                                                      _CODES[code]) for c in calls)
        if kind == "allreduce":
            for c in calls:
                _memory(c[2], count, code)[...] = total
        else:
            _memory(calls[root][2], count, code)[...] = total


def get_unique_id():
    return os.urandom(128)


def install(monkeypatch, n_devices: int = 2, nccl_available: bool = True):
    """Put the fake 'cupy', 'cupy.cuda' and 'cupy.cuda.nccl' into sys.modules for one test."""
    global N_DEVICES
    N_DEVICES = n_devices
    cupy = types.ModuleType("cupy")
    cupy.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    cupy.__version__ = "14.0.0"
    for name in ("ndarray", "empty", "zeros", "array", "asarray", "ascontiguousarray", "add", "concatenate",
                 "allclose"):
        setattr(cupy, name, FakeArray if name == "ndarray" else globals()[name])
    cuda = types.ModuleType("cupy.cuda")
    cuda.__spec__ = importlib.machinery.ModuleSpec("cupy.cuda", None)
    cuda.Device = Device
    cuda.get_current_stream = get_current_stream
    cuda.runtime = types.SimpleNamespace(getDeviceCount=getDeviceCount)
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.__spec__ = importlib.machinery.ModuleSpec("cupy.cuda.nccl", None)
    nccl.available = nccl_available
    if nccl_available:
        for name in ("NcclCommunicator", "groupStart", "groupEnd", "get_unique_id", "NcclError"):
            setattr(nccl, name, globals()[name])
        nccl.NCCL_SUM = 0
        for code, dt in _CODES.items():
            setattr(nccl, f"NCCL_{np.dtype(dt).name.upper()}", code)  # NCCL_BFLOAT16 with ml_dtypes
    cuda.nccl = nccl
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    stats.update(groups=0, calls=0)
    return cupy


def on(device: int, a) -> FakeArray:
    """A copy of ``a`` placed on fake GPU ``device``."""
    with Device(device):
        return array(a)
