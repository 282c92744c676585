"""Random access to the pool's samples by `sample_id`, local or `s3://`.

Ingest gives sample ids 0..N-1 in shard order, so a sample's id is its global index in the
pool's MDS folder. Shards are fetched whole through the object-store layer on first use and
read with mosaicml-streaming's own MDS shard reader (hashes checked when `index.json` has them).
"""
from __future__ import annotations

import bisect
import json
import os
import tempfile
from typing import Iterator

import numpy as np

from schemas.errors import MatesError
from schemas.streams import check_relative_name
from schemas.storage import is_remote, store_for


class MDSFolder:
    """One MDS folder (an `index.json` and its shards) opened for random access."""

    def __init__(self, url: str, cache_dir: str | None = None, validate_hash: bool = True):
        self.url = url.rstrip("/")
        self.store = store_for(self.url)
        if not self.store.exists("index.json"):
            raise MatesError(f"`{self.url}/index.json` does not exist; not an MDS folder.")
        try:
            self.index = json.loads(self.store.read_bytes("index.json"))
            shards = self.index["shards"]
        except (ValueError, KeyError, TypeError) as exc:
            raise MatesError(f"`{self.url}/index.json` is not an MDS index: {exc}") from exc
        for i, shard in enumerate(shards):
            check_relative_name(shard["raw_data"]["basename"], f"{self.url}/index.json shards[{i}].basename")
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="mates-mds-")
        self.cache_dir = cache_dir or self._tmp.name
        self.validate_hash = validate_hash
        self.starts = np.cumsum([0] + [s["samples"] for s in shards]).tolist()
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def columns(self) -> dict[str, str]:
        """MDS column name -> encoding, as the pool was written (tokens: ndarray:uint16 or uint32)."""
        shard = self.index["shards"][0] if self.index["shards"] else {}
        return dict(zip(shard.get("column_names", ["tokens", "sample_id"]),
                        shard.get("column_encodings", ["ndarray:uint16", "int64"])))

    def _reader(self, shard_ix: int):
        if shard_ix not in self._readers:
            from streaming.base.format import reader_from_json

            shard = self.index["shards"][shard_ix]
            basename = shard["raw_data"]["basename"]
            local = os.path.join(self.cache_dir, basename)
            if not is_remote(self.url):
                local_dir = self.store.root
            else:
                if not os.path.exists(local):
                    self.store.get_file(local, basename)
                local_dir = self.cache_dir
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
            self._readers[shard_ix] = reader
        return self._readers[shard_ix]

    def _check_hashes(self, path: str, hashes: dict, basename: str) -> None:
        from streaming.base.hashing import get_hash

        with open(path, "rb") as handle:
            data = handle.read()
        for algo, digest in hashes.items():
            if get_hash(algo, data) != digest:
                raise MatesError(f"`{self.url}/{basename}` fails its {algo} check (corrupted shard).")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise MatesError(f"`sample_id` {index} is outside the pool at {self.url} (0..{len(self) - 1}).")
        shard_ix = bisect.bisect_right(self.starts, index) - 1
        return self._reader(shard_ix).get_item(index - self.starts[shard_ix])

    def iter_items(self, indices: np.ndarray) -> Iterator[dict]:
        """Samples in the order given (shards fetched as first touched)."""
        for index in indices:
            yield self[int(index)]
