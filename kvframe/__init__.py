"""kvframe: a key-value store for data-parallel training, with Apache MXNet's KVStore API,
built as a plugin framework (stores, transports, compressors and optimizers are plugins)."""

from kvframe import config, errors, plugins
from kvframe.arrays import RowSparseArray
from kvframe.errors import KVFrameError
from kvframe.hookspecs import hookimpl
from kvframe.store import KVStore, StoreBackend, create, create_from_config

__version__ = "0.1.0"
__all__ = [
    "config",
    "errors",
    "plugins",
    "KVStore", "StoreBackend", "RowSparseArray", "KVFrameError", "create", "create_from_config", "hookimpl"]
