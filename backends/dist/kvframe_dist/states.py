"""The file format of a distributed store's optimizer states: every server's states in one file."""

from __future__ import annotations

import json
import struct

STATES_MAGIC = b"KVFDIST1"


def pack_states(blobs: list[bytes], meta: dict) -> bytes:
    """One file for the states of all servers: magic, JSON index, then each server's bytes."""
    head = json.dumps({**meta, "servers": len(blobs), "sizes": [len(b) for b in blobs]}).encode()
    return b"".join([STATES_MAGIC, struct.pack("<Q", len(head)), head, *blobs])


def unpack_states(data: bytes) -> tuple[dict, list[bytes]]:
    if not data.startswith(STATES_MAGIC) or len(data) < len(STATES_MAGIC) + 8:
        raise ValueError("not a kvframe distributed optimizer-state file (saved by a dist store's "
                         "save_optimizer_states)")
    off = len(STATES_MAGIC)
    (n,) = struct.unpack_from("<Q", data, off)
    off += 8
    meta = json.loads(data[off:off + n])
    off += n
    blobs = []
    for size in meta["sizes"]:
        blobs.append(bytes(data[off:off + size]))
        off += size
    if off != len(data):
        raise ValueError("the optimizer-state file is truncated or has trailing bytes")
    return meta, blobs
