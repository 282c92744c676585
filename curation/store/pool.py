"""Random access to the pool's samples by `sample_id`, local or `s3://`.

Ingest gives sample ids 0..N-1 in shard order, so a sample's id is its global index in the
pool's MDS folder. A remote pool's shards are fetched whole through the object-store layer on
first use into the process's bounded shard cache (curation/store/shard_cache.py), a local pool's
are read in place; either is read with mosaicml-streaming's own MDS shard reader (hashes checked
when `index.json` has them, after every download).
"""
from __future__ import annotations

import bisect
import json
import os
from typing import Iterator

import numpy as np

from curation.store.shard_cache import ShardCache, shared_cache
from schemas.errors import MatesError
from schemas.streams import check_relative_name
from schemas.storage import is_remote, store_for


def read_index(url: str):
    """(store, parsed index.json) of the MDS folder `url`; a missing or malformed index is one line."""
    store = store_for(url)
    if not store.exists("index.json"):
        raise MatesError(f"`{url}/index.json` does not exist; not an MDS folder.")
    try:
        index = json.loads(store.read_bytes("index.json"))
        shards = index["shards"]
        for i, shard in enumerate(shards):
            check_relative_name(shard["raw_data"]["basename"], f"{url}/index.json shards[{i}].basename")
    except (ValueError, KeyError, TypeError) as exc:
        raise MatesError(f"`{url}/index.json` is not an MDS index: {exc}") from exc
    return store, index


def shard_samples_of(index: dict, url: str) -> list[int]:
    """Samples per shard of a parsed index.json, in shard (= sample id) order."""
    counts = [s.get("samples") if isinstance(s, dict) else None for s in index["shards"]]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise MatesError(f"`{url}/index.json` is not an MDS index: a shard lacks a `samples` count >= 0.")
    return counts


def shard_samples(url: str) -> list[int]:
    """Samples per shard of the MDS folder `url` (one small read: its index.json)."""
    return shard_samples_of(read_index(url.rstrip("/"))[1], url.rstrip("/"))


class MDSFolder:
    """One MDS folder (an `index.json` and its shards) opened for random access."""

    def __init__(self, url: str, validate_hash: bool = True, cache: ShardCache | None = None):
        """`cache`: where remote shards are held (None: the process's shared cache)."""
        self.url = url.rstrip("/")
        self.store, self.index = read_index(self.url)
        self.remote = is_remote(self.url)
        self.cache = cache
        self.validate_hash = validate_hash
        self.starts = np.cumsum([0] + shard_samples_of(self.index, self.url)).tolist()
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def columns(self) -> dict[str, str]:
        """MDS column name -> encoding, as the pool was written (tokens: ndarray:uint16 or uint32)."""
        shard = self.index["shards"][0] if self.index["shards"] else {}
        return dict(zip(shard.get("column_names", ["tokens", "sample_id"]),
                        shard.get("column_encodings", ["ndarray:uint16", "int64"])))

    def _reader(self, shard_ix: int):
        """Shard `shard_ix`'s reader; its file is checked when first opened and after a download."""
        if self.remote:
            raw = self.index["shards"][shard_ix]["raw_data"]
            local_dir, fresh = (self.cache or shared_cache()).fetch(self.store, raw["basename"], raw["bytes"],
                                                                    str(raw.get("hashes") or ""))
        else:
            local_dir, fresh = self.store.root, False
        if fresh or shard_ix not in self._readers:
            self._readers[shard_ix] = self._open(shard_ix, local_dir)
        return self._readers[shard_ix]

    def _open(self, shard_ix: int, local_dir: str):
        from streaming.base.format import reader_from_json

        shard = self.index["shards"][shard_ix]
        basename = shard["raw_data"]["basename"]
        reader = reader_from_json(local_dir, None, shard)
        reader.validate(allow_unsafe_types=False)
        path = os.path.join(local_dir, basename)
        if not os.path.exists(path):
            raise MatesError(f"`{self.url}/{basename}` is missing (index.json lists it); the pool was "
                             f"damaged: re-ingest it (`mates ingest --force`).")
        expected = os.path.getsize(path)
        if expected != shard["raw_data"]["bytes"]:
            raise MatesError(f"`{self.url}/{basename}` has {expected} bytes; index.json says "
                             f"{shard['raw_data']['bytes']} (truncated or replaced shard).")
        if self.validate_hash and shard["raw_data"].get("hashes"):
            self._check_hashes(path, shard["raw_data"]["hashes"], basename)
        return reader

    def _check_hashes(self, path: str, hashes: dict, basename: str) -> None:
        from streaming.base.hashing import get_hash

        with open(path, "rb") as handle:
            data = handle.read()
        for algo, digest in hashes.items():
            if get_hash(algo, data) != digest:
                raise MatesError(f"`{self.url}/{basename}` fails its {algo} check (corrupted shard).")

    def bytes_of(self, ids: np.ndarray) -> int:
        """Bytes of the distinct shards holding the sample ids `ids`."""
        shards = np.unique(np.searchsorted(self.starts, np.asarray(ids), side="right") - 1)
        return int(sum(self.index["shards"][int(k)]["raw_data"]["bytes"] for k in shards))

    def cache_limit(self) -> int:
        return (self.cache or shared_cache()).limit

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise MatesError(f"`sample_id` {index} is outside the pool at {self.url} (0..{len(self) - 1}).")
        shard_ix = bisect.bisect_right(self.starts, index) - 1
        return self._reader(shard_ix).get_item(index - self.starts[shard_ix])

    def iter_items(self, indices: np.ndarray) -> Iterator[dict]:
        """Samples in the order given (shards fetched as first touched)."""
        for index in indices:
            yield self[int(index)]
