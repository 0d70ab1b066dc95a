"""What the core expects of plugin objects (structural types: plugins need not subclass these)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol, TypeAlias, Union, runtime_checkable

import numpy as np

from kvframe.arrays import Array
from kvframe.config import CompressionConfig, OptimizerConfig, TransportConfig

#: One frame of a message as :meth:`Transport.send` takes it: any C-contiguous buffer (bytes, a
#: memoryview, a numpy array...); its raw bytes travel, nothing is pickled.
Frame: TypeAlias = Union[bytes, bytearray, memoryview, np.ndarray]
#: A message as :meth:`Transport.recv` gives it: one flat byte view per frame, in order.
Frames: TypeAlias = list[memoryview]


@runtime_checkable
class Updater(Protocol):
    """Applies an optimizer step in place: ``updater(key, grad, weight)``."""

    def __call__(self, key: Hashable, grad: Array, weight: Array) -> None: ...


@runtime_checkable
class StatefulUpdater(Updater, Protocol):
    def get_states(self, dump_optimizer: bool = False) -> bytes: ...

    def set_states(self, data: bytes) -> None: ...


@runtime_checkable
class CheckedUpdater(Updater, Protocol):
    """An updater that can say beforehand whether it will take a key's gradient (its dtype, its
    shape): a store calls ``check`` on every key of a push of several keys before it changes any,
    so such a push is all or nothing without staging copies of the values."""

    def check(self, key: Hashable, grad: Array, weight: Array) -> None: ...


@runtime_checkable
class Optimizer(Protocol):
    """What ``set_optimizer`` needs: the validated config (sent to servers) and an updater."""

    # read-only here, so that a plain attribute holding a subclass (the plugin's own model) matches
    @property
    def config(self) -> OptimizerConfig: ...

    def create_updater(self) -> StatefulUpdater: ...


@runtime_checkable
class StatesChecker(Protocol):
    """An optimizer that can refuse saved states before they are loaded: ``load_optimizer_states``
    calls ``check_states(data, {key: (shape, dtype)})`` (unless the store keeps its own container,
    ``StoreBackend.own_states_format``) and raises the optimizer's error before anything changes."""

    def check_states(self, data: bytes, weights: Mapping[Hashable, tuple[tuple[int, ...], np.dtype]] | None = None
                     ) -> None: ...


@runtime_checkable
class Compressor(Protocol):
    """A gradient compressor. ``encode`` folds ``grad`` into ``residual`` (error feedback) and
    returns the payload array; ``decode`` writes (or adds, with ``accumulate``) the dense values
    into ``out``, which has the original gradient's shape and dtype."""

    @property
    def config(self) -> CompressionConfig: ...

    def compressed_nbytes(self, size: int) -> int: ...

    def encode(self, grad: Array, residual: Array) -> Array: ...

    def decode(self, payload: Array, out: Array, accumulate: bool = False) -> Array: ...


@runtime_checkable
class DTypeCheckingCompressor(Compressor, Protocol):
    """A compressor that refuses a gradient dtype it cannot encode (``ValueError`` or ``TypeError``,
    saying why): a store checks every pushed key with it before any key changes."""

    def check_dtype(self, dtype: np.dtype) -> None: ...


@runtime_checkable
class BlockCodec(Compressor, Protocol):
    """An element-wise compressor: encoding aligned slices of ``block_multiple`` elements one by
    one gives the same payload bytes, residual and decoded values as encoding the whole array
    (``block_multiple`` None: it is not element-wise after all, e.g. a threshold from the whole
    array).  The ``device`` store then fuses encode, decode and the sum of the copies block by
    block, each block staying in the CPU cache."""

    block_multiple: int | None


@runtime_checkable
class FusedBlockCodec(BlockCodec, Protocol):
    """A :class:`BlockCodec` that does encode, decode and the sum in one pass over a block:
    ``out (+)= decode(encode(grad, residual))`` with ``residual`` updated in place, the same values
    as the two calls, without making the payload (a compiled kernel)."""

    def encode_decode_into(self, grad: Array, residual: Array, out: Array, accumulate: bool) -> None: ...


@runtime_checkable
class FusedSumCodec(FusedBlockCodec, Protocol):
    """A :class:`FusedBlockCodec` that also sums several copies in one pass over a block:
    ``out (+)= sum of decode(encode(grads[i], residuals[i]))``, added in copy order (the same values
    as ``encode_decode_into`` per copy)."""

    def encode_decode_sum_into(self, grads: Sequence[Array], residuals: Sequence[Array], out: Array,
                               accumulate: bool = False) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """Moves messages between the processes of a distributed job; knows nothing of their meaning.

    One instance is one endpoint of one process. It may ``listen`` (servers, the scheduler) and
    ``connect`` to endpoints that listen (workers, servers); every message that reaches it, from
    any peer, comes out of ``recv``, in order per peer. A message is a list of frames (bytes-like);
    frame boundaries are kept. Frames of any size travel as raw bytes: nothing is pickled.

    Peers are opaque hashable handles: ``connect`` returns one, ``recv`` returns the handle of the
    sender (for a peer this endpoint connected to, the very handle ``connect`` returned), and
    ``send`` takes either. One thread uses an instance at a time; ``close`` may come from any.
    Every message larger than ``config.max_message_bytes`` is refused before it is buffered, and
    so is a first message on an accepted connection larger than ``config.max_first_message_bytes``;
    messages waiting for ``recv`` never hold more than about ``config.max_queued_bytes``.

    Transports may also offer ``broken(peer) -> str | None`` (why a connection broke),
    ``disconnect(peer)`` (drop a peer that failed authentication: nothing more is read from it)
    and ``shared_memory_peers()``; the roles use them where present.
    """

    @property
    def config(self) -> TransportConfig: ...

    def listen(self, host: str, port: int = 0) -> str:
        """Accept connections on ``host:port`` (port 0: a free one). Returns the address peers
        pass to ``connect`` (``scheme://host:port``)."""
        ...

    def address(self, host: str, port: int) -> str:
        """The address ``connect`` takes for an endpoint of this transport listening at ``host:port``
        (a node knows only the scheduler's host and port, as MXNet's variables give them)."""
        ...

    def connect(self, address: str) -> Hashable:
        """A handle for sending to the endpoint listening at ``address`` (which ``listen`` returned).
        May connect lazily; raises ``TransportError`` for an address this transport cannot use."""
        ...

    def send(self, peer: Hashable, frames: Sequence[Frame]) -> None:
        """Send one message. Returns once the frames' memory may be reused by the caller. Raises
        ``TransportError`` when the peer is gone."""
        ...

    def recv(self, timeout: float) -> tuple[Hashable, Frames] | None:
        """The next message from any peer as ``(peer, frames)``, or None after ``timeout`` seconds.
        Frames stay valid until the caller drops them."""
        ...

    def close(self) -> None:
        """Close every connection and release every resource; idempotent."""
        ...
