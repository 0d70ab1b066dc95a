"""kvframe: a key-value store for data-parallel training, with Apache MXNet's KVStore API,
built as a plugin framework (stores, transports, compressors and optimizers are plugins)."""

from kvframe import config, errors, plugins
from kvframe.arrays import RowSparseArray
from kvframe.backend import StoreBackend
from kvframe.errors import KVFrameError
from kvframe.hookspecs import hookimpl
from kvframe.store import KVStore, create, create_from_config
from kvframe.sumkeys import is_sum_key, sum_key

__version__ = "0.1.0"
__all__ = [
    "config",
    "errors",
    "plugins",
    "KVStore", "StoreBackend", "RowSparseArray", "KVFrameError", "create", "create_from_config", "hookimpl",
    "sum_key", "is_sum_key"]
