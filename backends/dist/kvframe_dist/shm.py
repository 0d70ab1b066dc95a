"""Shared-memory fast path for workers and servers on one host (``KVFRAME_SHM_DIR``).

When the launcher starts a local job it makes a private directory under ``/dev/shm`` (mode 0700)
and passes it to every process.  Large shards then skip the socket copies:

* a worker copies a pushed shard into its own file ``w{rank}-k{key}-p{part}`` and sends only the
  name; the server sums straight from the mapped file and acknowledges the push once the round
  has consumed it (the worker waits for that before writing the file again);
* a server keeps large shards in files ``s{rank}-k{key}-p{part}`` behind a 4 KiB header whose
  first word is a sequence counter (odd while an update runs); in sync mode a pull reply names
  the file and the worker copies the value out, retrying while the counter moves.
* many small shards of one call (``BATCH_MIN`` bytes together) go the same ways in bulk: a
  worker's batch file ``w{rank}-b{server}-g{n}`` holds a call's raw shards for that server (8-byte
  aligned, in item order), and a server's bank file ``s{rank}-b{n}`` holds the small shards of one
  init call behind the same header; a reply names the bank and the byte range of the values.

Only names of exactly these forms are ever opened, only inside the job's directory, and only with
the size the key's shape and dtype give.  Everything else (headers, small arrays, other hosts)
goes over the socket as before.
"""

from __future__ import annotations

import mmap
import os
import re
import time

import numpy as np

HEADER = 4096
MIN_BYTES = 256 * 1024  # shards smaller than this go over the socket
BATCH_MIN = 16 * 1024  # many small shards of one message move through one file from this total size
_NAME = re.compile(r"[ws]\d+-k-?\d+-p\d+|s\d+-b\d+|w\d+-b\d+-g\d+")


def align8(n: int) -> int:
    return (n + 7) & ~7


def shm_dir() -> str | None:
    d = os.environ.get("KVFRAME_SHM_DIR")
    return d if d and os.path.isdir(d) else None


class Segment:
    """A file in the job's shm directory, mapped; ``array`` views the data after ``offset``."""

    def __init__(self, directory: str, name: str, nbytes: int | None, create: bool, offset: int = 0):
        """``nbytes=None`` (opening only): the file's own size, at least ``offset``."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"shared-memory name {name!r} is not one kvframe makes")
        self.path = os.path.join(directory, name)
        self.name = name
        self.owner = create
        total = offset + nbytes if nbytes is not None else None
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if total is None:
                total = os.fstat(fd).st_size
                if total <= offset:
                    raise ValueError(f"shared-memory file {name} has {total} bytes")
                nbytes = total - offset
            if create:
                os.ftruncate(fd, total)
            elif os.fstat(fd).st_size != total:
                raise ValueError(f"shared-memory file {name} has {os.fstat(fd).st_size} bytes, expected {total}")
            self.mm = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self.offset = offset
        self.nbytes = nbytes
        self.seq = memoryview(self.mm)[:8].cast("Q") if offset >= 8 else None

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape)) if shape else 1
        return np.frombuffer(self.mm, dtype, count, self.offset).reshape(shape)

    def begin_write(self) -> None:
        self.seq[0] += 1

    def end_write(self) -> None:
        self.seq[0] += 1

    def read_many(self, pairs: list, timeout: float = 30.0) -> None:
        """Copy each ``(src, views)`` (``src`` on this segment) into its views under one check of the
        sequence counter, retrying while a writer runs."""
        deadline = time.monotonic() + timeout
        seq = self.seq
        copyto = np.copyto
        while True:
            v1 = seq[0]
            if not v1 & 1:
                for src, views in pairs:
                    for v in views:
                        copyto(v, src)
                if seq[0] == v1:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"shared-memory values in {self.name} kept changing for {timeout:g} s")
            time.sleep(0.0005)

    def read_into(self, src: np.ndarray, views: list, timeout: float = 30.0) -> None:
        """Copy ``src`` (an array on this segment) into ``views``, retrying while a writer runs."""
        deadline = time.monotonic() + timeout
        while True:
            v1 = int(self.seq[0])
            if not v1 & 1:
                for v in views:
                    np.copyto(v, src)
                if int(self.seq[0]) == v1:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"shared-memory value {self.name} kept changing for {timeout:g} s")
            time.sleep(0.0005)

    def close(self) -> None:
        try:
            if self.seq is not None:
                self.seq.release()
            self.seq = None
            self.mm.close()
        except BufferError:  # a numpy view still alive: the mapping goes with the process
            pass
        if self.owner:
            try:
                os.unlink(self.path)
            except OSError:
                pass
