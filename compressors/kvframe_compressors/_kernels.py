"""Which CPU path the '2bit' and '1bit' codecs run: compiled numba kernels
(:mod:`kvframe_compressors._numba_kernels`), or numpy.  The choice is kvframe's one switch for
compiled kernels (``KVFRAME_KERNELS``, :mod:`kvframe.kernels`); both paths give bit-identical
payloads, residuals and decoded values.
"""

from __future__ import annotations

from types import ModuleType

from kvframe import kernels

COMPILED = "kvframe_compressors._numba_kernels"


def backend() -> str:
    """The path the 2bit/1bit CPU codecs run now: ``'numba'`` or ``'numpy'``."""
    return kernels.backend(COMPILED)


def set_backend(name: str | None) -> str:
    """Use ``name`` (``'numba'`` or ``'numpy'``) from now on, for every compiled kernel of kvframe;
    None goes back to ``KVFRAME_KERNELS`` (or the default).  Returns the path now in use."""
    kernels.set_backend(name)
    return backend()


def numba_kernels() -> ModuleType | None:
    """The compiled kernels' module when the numba path is in use, else None."""
    return kernels.compiled(COMPILED)
