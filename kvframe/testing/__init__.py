"""The plugin author's kit: :class:`StoreConformance`, a pytest suite of MXNet-compatible KVStore
semantics that any store plugin runs against itself (see ``kvframe.testing.conformance`` and
docs/plugin-guide.md), and :class:`TransportConformance`, the same for transport plugins (see
``kvframe.testing.transport_conformance``).  Importing this package needs pytest."""

from typing import Any

from kvframe.testing.conformance import StoreConformance

__all__ = ["StoreConformance", "TransportConformance"]


def __getattr__(name: str) -> Any:
    # loaded on first use: a store plugin's tests need not import the transport suite
    if name == "TransportConformance":
        from kvframe.testing.transport_conformance import TransportConformance

        return TransportConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
