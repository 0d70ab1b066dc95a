"""What the transports of this distribution share: ``tcp://HOST:PORT`` addresses, and frames as
flat byte views (any contiguous buffer: bytes, numpy arrays, memoryviews)."""

from __future__ import annotations

import re

import numpy as np

from kvframe.errors import TransportError
from kvframe.protocols import Frame

_ADDRESS = re.compile(r"^tcp://(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z]+)\]|(?P<host>[^:/\[\]\s]+)):(?P<port>\d{1,5})/?$")


def format_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    m = _ADDRESS.match(address) if isinstance(address, str) else None
    if m is None or not 0 < int(m["port"]) < 65536:
        raise TransportError(f"cannot use address {address!r}: expected tcp://HOST:PORT (IPv6 as tcp://[HOST]:PORT)")
    return m["v6"] or m["host"], int(m["port"])


def byte_view(frame: Frame, i: int) -> memoryview:
    """Frame ``i`` as a flat view of its bytes, without a copy."""
    if isinstance(frame, memoryview):
        mv = frame
    elif isinstance(frame, np.ndarray):
        mv = frame.data  # memoryview(frame), which numpy types as a buffer only on Python 3.12+
    else:
        mv = memoryview(frame)
    if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
        return mv
    if not mv.c_contiguous:
        raise TypeError(f"frame {i} is not a contiguous buffer")
    return mv.cast("B")
