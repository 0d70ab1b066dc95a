"""Gradient compression presets for ``DistributedOptimizer(compression=...)``, as Horovod's
``hvd.Compression``: they name a store compression config (set for every key of the store)."""

from __future__ import annotations

from typing import Any


class Compression:
    """``none``: no compression. ``twobit``: 2-bit with the scale-free threshold (``threshold_scale
    ='rms'``: each push's threshold is a multiple of the RMS of that key's residual-corrected
    gradient, so nothing needs tuning; small arrays travel exactly). ``fp16``, ``bf16``: half
    precision with error feedback. ``topk``: the largest 1% of each gradient, with error feedback."""

    none = None
    twobit = {"type": "2bit", "threshold_scale": "rms"}
    fp16 = {"type": "fp16"}
    bf16 = {"type": "bf16"}
    topk = {"type": "topk"}


_NAMES = {"none": None, "2bit": Compression.twobit, "twobit": Compression.twobit, "fp16": Compression.fp16,
          "bf16": Compression.bf16, "topk": Compression.topk}


def resolve_compression(compression: Any) -> Any:
    """A store compression config (or None) from a name, a dict or a config model. The name '2bit'
    means the scale-free form; ``{'type': '2bit', 'threshold': 0.5}`` is MXNet's absolute one."""
    if compression is None:
        return None
    if isinstance(compression, str):
        key = compression.strip().lower()
        if key in _NAMES:
            value = _NAMES[key]
            return dict(value) if value is not None else None
        return {"type": key}  # another installed compressor, validated by the store
    if isinstance(compression, dict):
        return dict(compression)
    return compression  # a config model: the store validates it


__all__ = ["Compression", "resolve_compression"]
