"""Each stage's candidate pool: a fresh, disjoint slice of the pool (`stages.candidates`).

`samples` (the MATES paper's): a seeded permutation of every sample id, cut into stages. Every
stage touches about every shard, so probing, scoring and index writing each download about the
whole pool per boundary, and the permutation holds 8 bytes per pool sample.

`shards`: a seeded permutation of the pool's shards, cut into consecutive stage slices by sample
count: stage k takes the samples at positions [k * per_stage, (k + 1) * per_stage) of the shards
laid end to end in that order, so it holds whole shards but for at most one split at each end. A
boundary then downloads about its candidates' bytes, and the plan costs O(shards) memory.

`auto` (the default) picks `shards` when every stage gets at least `MIN_SHARDS_PER_STAGE` shards.
Ingest writes one pool part per input file, so a shard holds one source when the inputs are
per-source files; a stage of a few shards would be a few sources. With n shards of one size drawn
at random, a source's share of a stage has a standard deviation of at most 1 / (2 sqrt(n)): 6
points at 64 shards, where the method's comparison against random still sees every source. Below that (small pools, the demo and the tests) `auto` is `samples`,
whose results are those of every run before this key existed.
"""
from __future__ import annotations

import numpy as np

from schemas.errors import MatesError

MODES = ("auto", "samples", "shards")
MIN_SHARDS_PER_STAGE = 64


def _check_size(pool_size: int, count: int, per_stage: int) -> None:
    need = count * per_stage
    if pool_size < need:
        raise MatesError(f"`stages.pool_per_stage` x `stages.count` = {need} candidates, but the pool "
                         f"holds {pool_size} samples; lower them or ingest more text.")


def shard_spans(shard_samples, *, count: int, per_stage: int, seed: int) -> list[list[tuple[int, int]]]:
    """Per stage, the (first id, end id) ranges of its shards (`shards` mode; ids are global)."""
    sizes = np.asarray(shard_samples, dtype=np.int64)
    _check_size(int(sizes.sum()), count, per_stage)
    first_id = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    order = np.random.default_rng([seed, 104729, 2]).permutation(len(sizes))
    at = np.concatenate([[0], np.cumsum(sizes[order])])   # where each drawn shard starts in the order
    spans = []
    for k in range(count):
        lo, hi = k * per_stage, (k + 1) * per_stage
        first = int(np.searchsorted(at, lo, side="right")) - 1   # the drawn shard holding position lo
        stage = []
        for j in range(first, len(order)):
            if at[j] >= hi:
                break
            start = first_id[order[j]]
            a, b = start + max(lo - at[j], 0), start + min(hi - at[j], sizes[order[j]])
            if b > a:
                stage.append((int(a), int(b)))
        spans.append(stage)
    return spans


def _ids_of(spans: list[tuple[int, int]], n: int) -> np.ndarray:
    """The sorted ids of disjoint id ranges, filled in place (no concatenated or sorted copy)."""
    out, at = np.empty(n, dtype=np.int64), 0
    for a, b in sorted(spans):
        out[at:at + b - a] = np.arange(a, b, dtype=np.int64)
        at += b - a
    return out


def choose_mode(shard_samples, *, count: int, per_stage: int, seed: int, mode: str = "auto") -> str:
    """`samples` or `shards`: `mode` itself, or what `auto` picks (see the module docstring)."""
    if mode not in MODES:
        raise MatesError(f"`stages.candidates` must be one of {', '.join(MODES)}; got {mode!r}.")
    if mode != "auto":
        return mode
    spans = shard_spans(shard_samples, count=count, per_stage=per_stage, seed=seed)
    return "shards" if min(len(s) for s in spans) >= MIN_SHARDS_PER_STAGE else "samples"


def candidate_pools(shard_samples, *, count: int, per_stage: int, seed: int,
                    mode: str = "samples") -> list[np.ndarray]:
    """`count` disjoint candidate pools of `per_stage` sample ids each (sorted within a pool), from
    the pool's samples per shard (index.json order: ids are consecutive across shards)."""
    sizes = np.asarray(shard_samples, dtype=np.int64)
    mode = choose_mode(sizes, count=count, per_stage=per_stage, seed=seed, mode=mode)
    if mode == "shards":
        return [_ids_of(s, per_stage) for s in shard_spans(sizes, count=count, per_stage=per_stage, seed=seed)]
    pool_size = int(sizes.sum())
    _check_size(pool_size, count, per_stage)
    order = np.random.default_rng([seed, 104729]).permutation(pool_size)
    return [np.sort(order[k * per_stage:(k + 1) * per_stage]) for k in range(count)]
