"""One switch for every compiled CPU kernel (the reducer's sum, the 2bit/1bit codecs, the
optimizer steps): ``KVFRAME_KERNELS=numba|numpy``, read at every call; unset or empty, numba where
it can be imported.  numba is optional: each part imports its compiled module on first use, and
without numba (or with ``numpy``) the numpy path runs, giving the same results.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

ENV = "KVFRAME_KERNELS"
BACKENDS = ("numba", "numpy")

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}  # compiled module name -> module, or None if it cannot be imported
_override: str | None = None


def _choice() -> str:
    name = (_override if _override is not None else os.environ.get(ENV, "")).strip().lower()
    if name not in ("", *BACKENDS):
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def _import(module: str) -> ModuleType | None:
    if module not in _modules:
        with _lock:
            if module not in _modules:
                try:
                    _modules[module] = importlib.import_module(module)
                except Exception:  # numba missing, or unusable here (this numpy, no cache directory...)
                    _modules[module] = None
    return _modules[module]


def compiled(module: str) -> ModuleType | None:
    """The compiled-kernel module ``module`` when the numba path is chosen, else None (numpy path).
    ``numba`` chosen by name where the module cannot be imported raises ImportError."""
    choice = _choice()
    if choice == "numpy":
        return None
    mod = _import(module)
    if mod is None and choice == "numba":
        raise ImportError(f"{ENV}=numba, but numba cannot be imported (pip install numba, or set {ENV}=numpy)")
    return mod


def backend(module: str) -> str:
    """``'numba'`` or ``'numpy'``: the path ``module``'s kernels take now."""
    return "numba" if compiled(module) is not None else "numpy"


def set_backend(name: str | None) -> None:
    """Choose ``'numba'`` or ``'numpy'`` for every part from now on (tests run both paths);
    None goes back to ``KVFRAME_KERNELS``."""
    global _override
    if name is not None and name.strip().lower() not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    _override = name
