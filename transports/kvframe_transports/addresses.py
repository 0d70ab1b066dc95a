"""What the transports of this distribution share: ``tcp://HOST:PORT`` addresses, and frames as
flat byte views (any contiguous buffer: bytes, numpy arrays, memoryviews)."""

from __future__ import annotations

import re
from typing import Any

from kvframe.errors import TransportError

_ADDRESS = re.compile(r"^tcp://(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z]+)\]|(?P<host>[^:/\[\]\s]+)):(?P<port>\d{1,5})/?$")


def format_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    m = _ADDRESS.match(address) if isinstance(address, str) else None
    if m is None or not 0 < int(m["port"]) < 65536:
        raise TransportError(f"cannot use address {address!r}: expected tcp://HOST:PORT (IPv6 as tcp://[HOST]:PORT)")
    return m["v6"] or m["host"], int(m["port"])


def byte_view(frame: Any, i: int) -> memoryview:
    """Frame ``i`` as a flat view of its bytes, without a copy."""
    mv = frame if isinstance(frame, memoryview) else memoryview(frame)
    if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
        return mv
    if not mv.c_contiguous:
        raise TypeError(f"frame {i} is not a contiguous buffer")
    return mv.cast("B")
