"""Dataloaders over MDS data: the pool, a stage index (weighted streams), in-memory tensors.

Remote MDS folders (`s3://...`) are cached under a per-process scratch folder keyed by the
remote URL, as mosaicml-streaming needs a distinct `local` per stream; local folders are read in
place.
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from curation.lm.batching import collate_samples
from schemas.errors import MatesError
from schemas.storage import export_endpoint_for_streaming, is_remote, store_for
from training import dist_utils

CACHE_ROOT = os.environ.get("MATES_STREAMING_CACHE") or os.path.join(tempfile.gettempdir(), "mates-streaming")


def stream_location(url: str, cache_tag: str = "") -> dict:
    """`remote`/`local` arguments for a `Stream` or `StreamingDataset` reading the MDS folder `url`."""
    if is_remote(url):
        export_endpoint_for_streaming()
        key = hashlib.sha1(f"{url}|{cache_tag}".encode()).hexdigest()[:16]
        return {"remote": url, "local": os.path.join(CACHE_ROOT, key)}
    return {"remote": None, "local": store_for(url).root}


def _clean_shared_memory() -> None:
    from streaming.base.util import clean_stale_shared_memory

    try:
        clean_stale_shared_memory()
    except Exception:  # best effort: another process may be cleaning at the same time
        pass


def streaming_dataset(streams: list[tuple[str, float]], *, batch_size: int, shuffle: bool, seed: int,
                      cache_tag: str = "", epoch_size: int | None = None):
    """A StreamingDataset over (url, proportion) streams; one stream with proportion None = plain."""
    from streaming import Stream, StreamingDataset

    _clean_shared_memory()
    for attempt in range(SHM_ATTEMPTS):
        # Object stores fail transiently (500/503, resets); streaming retries each shard download.
        # New Stream objects per attempt: a failed StreamingDataset has already given the old
        # ones their sample counts (`choose`), and a Stream with two weights is refused.
        stream_objs = [Stream(**stream_location(url, cache_tag), proportion=prop, download_retry=6)
                       for url, prop in streams]
        try:
            return StreamingDataset(streams=stream_objs, batch_size=batch_size, shuffle=shuffle,
                                    shuffle_seed=seed, epoch_size=epoch_size, replication=None,
                                    allow_unsafe_types=False)
        except FileExistsError:
            # Another process (a concurrent run of `mates compare --jobs N`) registered the same
            # shared-memory prefix between streaming's search and its create, or its stale-memory
            # sweep probed that name at that instant. Search again: the prefix is taken now. A
            # multi-rank job cannot retry on one rank alone (streaming's barriers would disagree).
            if attempt + 1 == SHM_ATTEMPTS or dist_utils.world_size() > 1:
                raise
            time.sleep(0.2 + random.random())


SHM_ATTEMPTS = 5


def mds_loader(dataset, *, batch_size: int, pad_id: int, num_workers: int = 0) -> DataLoader:
    """Full batches only: a stage index rarely holds a multiple of the batch (1,250 samples in
    batches of 16 leave 2), and a short last batch would be one step on 2 samples, weighted like
    a full one (and Composer warns that it cannot split it into microbatches). Dropping it skips
    fewer than `batch_size` samples per pass; the next pass reshuffles, so every sample still
    gets its turn."""
    if len(dataset) < batch_size:
        raise MatesError(f"the training data holds {len(dataset)} samples per rank, fewer than one batch "
                         f"({batch_size}); raise the stage's selection or lower `train_loader.batch_size`.")
    collate = functools.partial(collate_samples, pad_id=pad_id)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                      drop_last=True, persistent_workers=False)


class InMemorySamples(torch.utils.data.Dataset):
    """The same samples as an MDS dataset, held as tensors (for throughput comparisons)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]
