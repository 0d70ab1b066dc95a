"""What a store plugin implements: :class:`StoreBackend`, the handles its non-blocking calls
return, and the pieces every in-process store shares (updater keeping, the summable check).

The user's front, :class:`kvframe.store.KVStore`, checks and normalises every argument before a
backend sees it: keys come as a list, values as a list (one per key) of lists (one array per
device), and every key was initialised with the same shape and dtype.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, TypeAlias, Union

import numpy as np

from kvframe.arrays import Array
from kvframe.errors import DTypeMismatchError, KVTimeoutError, NotSupportedError

#: A key, as the front gives it to a store: an int or a str (never both in one store).
Key: TypeAlias = Union[int, str]
#: The keys of one call, in order (a key may repeat in a push: its values are summed).
Keys: TypeAlias = list[Key]
#: One entry per key, each a list of arrays (one per device): values pushed, or outputs to fill.
PerKey: TypeAlias = list[list[Array]]


def _env_timeout(name: str = "KVFRAME_TIMEOUT", default: float = 120.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise ValueError(f"environment variable {name}={raw!r}: expected a positive number of seconds, e.g. "
                         f"{name}=300 (default {default:g})")
    return value


DEFAULT_TIMEOUT = _env_timeout()

class Handle:
    """The result of a non-blocking operation: ``wait()`` returns once it is done."""

    def wait(self, timeout: float | None = None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def done(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class CompletedHandle(Handle):
    def wait(self, timeout: float | None = None) -> None:
        return None

    def done(self) -> bool:
        return True


COMPLETED = CompletedHandle()


class FutureHandle(Handle):
    """Wraps a ``concurrent.futures.Future``; ``what`` names it in a timeout error."""

    def __init__(self, future: Any, what: str):
        self._future = future
        self._what = what

    def wait(self, timeout: float | None = None) -> None:
        try:
            self._future.result(timeout=DEFAULT_TIMEOUT if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            waited = DEFAULT_TIMEOUT if timeout is None else timeout
            raise KVTimeoutError(f"timed out after {waited:g} s waiting for {self._what}") from None

    def done(self) -> bool:
        return self._future.done()


class StoreBackend:
    """Base of every store type. Methods get normalised lists; override what the store supports.

    ``keys``: list of int or str.  ``values``: list (per key) of lists (per device) of arrays
    (numpy, cupy or :class:`RowSparseArray`).  ``outs``: the same shape of lists.
    """

    capabilities: frozenset[str] = frozenset({"optimizer"})
    #: True when ``get_optimizer_states`` writes a container of the store's own (the dist stores
    #: gather every server's states): the front then leaves checking them to the store.
    own_states_format: bool = False

    def __init__(self, config: Any):
        self.config = config

    # identity -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0

    @property
    def num_workers(self) -> int:
        return 1

    # data -----------------------------------------------------------------------------------
    def init(self, keys: Keys, values: list[Array]) -> None:
        """Store a copy of ``values[i]`` (one array) under ``keys[i]``."""
        raise NotImplementedError

    def push(self, keys: Keys, values: PerKey, priority: int = 0) -> None:
        raise NotImplementedError

    def push_donated(self, keys: Keys, values: PerKey, priority: int = 0) -> None:
        """``push`` of arrays the caller hands over (``KVStore.push(..., donate=True)``): a store may
        keep them instead of copying.  The default copies, as ``push`` does."""
        self.push(keys, values, priority)

    def pull(self, keys: Keys, outs: PerKey, priority: int = 0, ignore_sparse: bool = True) -> Handle:
        raise NotImplementedError

    def pushpull(self, keys: Keys, values: PerKey, outs: PerKey, priority: int = 0) -> Handle:
        # every key's reduction finishes before any output is written: outs may alias the inputs
        self.push(keys, values, priority)
        return self.pull(keys, outs, priority)

    def broadcast(self, keys: Keys, values: PerKey, outs: PerKey, priority: int = 0) -> Handle:
        self.init(keys, [v[0] for v in values])
        return self.pull(keys, outs, priority)

    def row_sparse_pull(self, keys: Keys, outs: PerKey, row_ids: PerKey, priority: int = 0) -> Handle:
        raise NotSupportedError(f"store {type(self).__name__} does not support row_sparse_pull")

    # updates --------------------------------------------------------------------------------
    def set_updater(self, updater: Any) -> None:
        raise NotSupportedError(f"store {type(self).__name__} does not run updaters")

    def set_optimizer(self, optimizer: Any) -> None:
        self.set_updater(optimizer.create_updater())

    def set_gradient_compression(self, compressor: Any) -> None:
        raise NotSupportedError(f"store {type(self).__name__} does not support gradient compression")

    def get_optimizer_states(self, dump_optimizer: bool = False) -> bytes:
        raise NotSupportedError(f"store {type(self).__name__} keeps no optimizer states")

    def set_optimizer_states(self, data: bytes) -> None:
        raise NotSupportedError(f"store {type(self).__name__} keeps no optimizer states")

    # control --------------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None) -> None:
        """Single-process stores have nothing to wait for."""

    def send_command_to_servers(self, head: int, body: str) -> None:
        """Single-process stores have no servers: the command is ignored, as MXNet does."""

    def close(self) -> None:
        pass


class InProcessUpdates:
    """For stores that run the updater in this process: keeps it, and saves and loads its states."""

    _updater: Any = None

    def set_updater(self, updater: Any) -> None:
        self._updater = updater

    def get_optimizer_states(self, dump_optimizer: bool = False) -> bytes:
        if self._updater is None or not hasattr(self._updater, "get_states"):
            raise NotSupportedError("there are no optimizer states to save: call set_optimizer first")
        return self._updater.get_states(dump_optimizer)

    def set_optimizer_states(self, data: bytes) -> None:
        if self._updater is None or not hasattr(self._updater, "set_states"):
            raise NotSupportedError("load_optimizer_states needs an optimizer: call set_optimizer first")
        self._updater.set_states(data)


# dtype kinds a store can sum: bool, signed and unsigned integers, floating point, complex
SUMMABLE_KINDS = "biufc"
SUMMABLE_TEXT = ("bool, int8/16/32/64, uint8/16/32/64, float16/32/64 (and longdouble), complex64/128 (a store "
                 "may accept fewer)")


def check_summable(key: Any, dtype: Any, what: str = "value") -> None:
    """Refuse, naming the key, a dtype the stores cannot sum (object, str/bytes, datetime/timedelta,
    void/structured): numpy would fail later, mid-push, with a message that names no key."""
    dt = np.dtype(dtype)
    if dt.kind not in SUMMABLE_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise DTypeMismatchError(f"key {key!r}: the {what} has dtype {dt}, which a store cannot sum (pushes are "
                                 f"summed); accepted dtypes: {SUMMABLE_TEXT}")


__all__ = ["StoreBackend", "Handle", "CompletedHandle", "COMPLETED", "FutureHandle", "InProcessUpdates",
           "check_summable", "DEFAULT_TIMEOUT", "Key", "Keys", "PerKey"]
