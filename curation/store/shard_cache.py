"""Whole shards of remote pools on local disk, within a byte bound (`stages.cache_limit`).

mosaicml-streaming's shard reader reads a local file, so `MDSFolder` fetches a remote shard whole
before reading a sample of it. Before this cache each `MDSFolder` fetched into its own temporary
folder and kept every shard it touched until it was garbage collected: a boundary that opens the
pool for probing, scoring and index writing downloaded a shard once per phase, and a stage whose
candidates spread over the pool held the whole pool on disk.

One cache per process serves every `MDSFolder`: a shard is fetched once while it fits; adding one
that would take the cache over `limit` bytes first removes the least recently read shards (a
shard larger than the limit alone is still fetched and held: it is being read); the stage loop
empties the cache when a boundary is done (`release`), so the next stage starts from nothing.
"""
from __future__ import annotations

import collections
import hashlib
import os
import tempfile
import threading

DEFAULT_LIMIT = 8 << 30   # bytes; StagesConfig.cache_limit's default too


class ShardCache:
    """Local copies of remote shards, least recently read first; `held_bytes` <= `limit` but for
    a single shard larger than the limit."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self._tmp = tempfile.TemporaryDirectory(prefix="mates-shards-")   # removed at exit
        self.root = self._tmp.name
        # local path -> ((index bytes, signature), bytes on disk), least recently read first
        self._held: collections.OrderedDict[str, tuple[tuple, int]] = collections.OrderedDict()
        self.held_bytes = 0
        self.fetched_bytes = 0    # downloaded over this cache's life (logs, tests)
        self._lock = threading.Lock()

    def folder(self, url: str) -> str:
        """The local folder mirroring the remote folder `url` (shard basenames are relative to it)."""
        return os.path.join(self.root, hashlib.sha1(url.encode()).hexdigest()[:16])

    def fetch(self, store, basename: str, nbytes: int, signature: str = "") -> tuple[str, bool]:
        """(local folder holding `basename` of `store`, whether it was downloaded by this call).
        `nbytes` and `signature` are the shard's index entry: a different one is fetched anew."""
        path = os.path.join(self.folder(store.url), basename)
        with self._lock:
            if path in self._held and self._held[path][0] == (nbytes, signature):
                self._held.move_to_end(path)
                return self.folder(store.url), False
            self._drop(path)
            self._make_room(nbytes)
            try:
                store.get_file(path, basename)
            except BaseException:
                if os.path.exists(path):   # a partial download is not held
                    os.remove(path)
                raise
            size = os.path.getsize(path)
            self._held[path] = ((nbytes, signature), size)
            self.held_bytes += size
            self.fetched_bytes += size
            return self.folder(store.url), True

    def _make_room(self, nbytes: int) -> None:
        while self._held and self.held_bytes + nbytes > self.limit:
            self._drop(next(iter(self._held)))

    def _drop(self, path: str) -> None:
        if path in self._held:
            self.held_bytes -= self._held.pop(path)[1]
            if os.path.exists(path):
                os.remove(path)

    def set_limit(self, limit: int) -> None:
        """A new bound; shards past it go at once."""
        with self._lock:
            self.limit = limit
            self._make_room(0)

    def release(self) -> None:
        """Remove every held shard (a boundary is done); the cache stays usable."""
        with self._lock:
            for path in list(self._held):
                self._drop(path)


_SHARED: dict[int, ShardCache] = {}


def shared_cache() -> ShardCache:
    """This process's cache (per process id: a forked child does not remove its parent's files)."""
    pid = os.getpid()
    if pid not in _SHARED:
        _SHARED[pid] = ShardCache()
    return _SHARED[pid]


def set_limit(limit: int) -> None:
    """Bound this process's cache to `limit` bytes (the recipe's `stages.cache_limit`)."""
    shared_cache().set_limit(limit)
