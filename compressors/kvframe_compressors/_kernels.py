"""Which CPU path the '2bit' and '1bit' codecs run: compiled numba kernels, or numpy.

``KVFRAME_KERNELS=numba|numpy`` chooses (read once, on first use); unset, numba is used when it
can be imported.  numba is optional: it is imported only when a kernel first runs, and without it
the numpy path runs.  Both paths give bit-identical payloads, residuals and decoded values.
:func:`set_backend` switches at run time (tests force both paths with it).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from types import ModuleType

BACKENDS = ("numba", "numpy")
ENV = "KVFRAME_KERNELS"

_lock = threading.Lock()
_backend: str | None = None
_module: ModuleType | None = None


def _load() -> ModuleType:
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                from kvframe_compressors import _numba_kernels

                _module = _numba_kernels
    return _module


def _resolve(name: str | None) -> str:
    name = (name or "").strip().lower()
    if name not in ("", *BACKENDS):
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "numpy":
        return "numpy"
    if importlib.util.find_spec("numba") is None:
        if name == "numba":
            raise ImportError(f"{ENV}=numba, but numba is not installed (pip install numba, or set {ENV}=numpy)")
        return "numpy"
    try:
        _load()
    except Exception:  # a broken numba install: run numpy, unless numba was asked for by name
        if name == "numba":
            raise
        return "numpy"
    return "numba"


def backend() -> str:
    """The path the 2bit/1bit CPU codecs run now: ``'numba'`` or ``'numpy'``."""
    global _backend
    b = _backend
    if b is None:
        b = _backend = _resolve(os.environ.get(ENV))
    return b


def set_backend(name: str | None) -> str:
    """Use ``name`` (``'numba'`` or ``'numpy'``) from now on; None goes back to ``KVFRAME_KERNELS``
    (or the default).  Returns the path now in use."""
    global _backend
    _backend = _resolve(os.environ.get(ENV) if name is None else name)
    return _backend


def numba_kernels() -> ModuleType | None:
    """The compiled kernels' module when the numba path is in use, else None."""
    return _module if backend() == "numba" else None
