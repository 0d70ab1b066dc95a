"""What the core expects of plugin objects (structural types: plugins need not subclass these)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Updater(Protocol):
    """Applies an optimizer step in place: ``updater(key, grad, weight)``."""

    def __call__(self, key: Hashable, grad: Any, weight: Any) -> None: ...


@runtime_checkable
class StatefulUpdater(Updater, Protocol):
    def get_states(self, dump_optimizer: bool = False) -> bytes: ...

    def set_states(self, data: bytes) -> None: ...


@runtime_checkable
class Optimizer(Protocol):
    """What ``set_optimizer`` needs: the validated config (sent to servers) and an updater."""

    config: Any  # a kvframe.config.OptimizerConfig

    def create_updater(self) -> StatefulUpdater: ...


@runtime_checkable
class Compressor(Protocol):
    """A gradient compressor. ``encode`` folds ``grad`` into ``residual`` (error feedback) and
    returns the payload array; ``decode`` writes (or adds, with ``accumulate``) the dense values
    into ``out``, which has the original gradient's shape and dtype."""

    config: Any  # a kvframe.config.CompressionConfig

    def compressed_nbytes(self, size: int) -> int: ...

    def encode(self, grad: Any, residual: Any) -> Any: ...

    def decode(self, payload: Any, out: Any, accumulate: bool = False) -> Any: ...
