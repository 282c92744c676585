"""Read handles that DuckDB's threads may share, for the fsspec filesystems we register with it.

DuckDB reads a registered (Python) filesystem's file as `seek(offset)` then `read(n)`, from several
threads on one handle. Interleaved, one thread reads the bytes another seeked to: seen on a local
catalog of 19 row groups as "Perfect hash aggregate ... statistics corrupt", "Invalid data" or
"Out of buffer", one query in two. `SharedReader` keeps a position per thread and runs each
seek-and-read under a lock; `for_duckdb` gives a filesystem whose read handles are shared readers.
"""
from __future__ import annotations

import copy
import threading


class SharedReader:
    """A read handle that DuckDB's threads may share. DuckDB reads a registered filesystem's file
    as `seek(offset)` then `read(n)` from several threads on one handle; interleaved, one thread
    read another's bytes (seen: "Perfect hash aggregate ... statistics corrupt", "Invalid data" on
    a 19-row-group catalog). Each thread keeps its own position; a seek and its read run together."""

    def __init__(self, handle):
        self._handle, self._lock, self._local = handle, threading.Lock(), threading.local()

    def _position(self) -> int:
        return getattr(self._local, "pos", 0)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position(), 2: self._handle.size if whence == 2 else 0}[whence]
        self._local.pos = base + offset
        return self._local.pos

    def tell(self) -> int:
        return self._position()

    def read(self, n: int = -1) -> bytes:
        with self._lock:
            self._handle.seek(self._position())
            data = self._handle.read(n)
        self._local.pos = self._position() + len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _open_shared(self, path, mode="rb", *args, **kwargs):
    handle = super(type(self), self).open(path, mode, *args, **kwargs)
    return SharedReader(handle) if mode == "rb" else handle


def for_duckdb(fs):
    """A copy of the fsspec filesystem `fs` (same connection and settings) whose `open(..., "rb")`
    returns a `SharedReader`: what `duckdb.register_filesystem` should get."""
    shared = copy.copy(fs)
    shared.__class__ = type(f"Shared{type(fs).__name__}", (type(fs),), {"open": _open_shared})
    return shared
