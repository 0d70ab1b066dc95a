"""The plugin author's kit: :class:`StoreConformance`, a pytest suite of MXNet-compatible KVStore
semantics that any store plugin runs against itself (see ``kvframe.testing.conformance`` and
docs/plugin-guide.md).  Importing this package needs pytest."""

from kvframe.testing.conformance import StoreConformance

__all__ = ["StoreConformance"]
