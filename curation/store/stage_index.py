"""The stage index writer (DESIGN.md 2.5): selection table -> reweighted MDS streams.

MDS cannot point at a subset of a shard, so the selected samples are materialised: one MDS
folder per bucket under `<run>/stages/<k>/index/<bucket>/`, then `streams.json` (bucket ->
path, remote, proportion) and `streams.yaml` (an llm-foundry `streams:` block), then
`selection.parquet`, and `_SUCCESS` last. A stage without `_SUCCESS` does not exist.

Within a bucket, samples keep the order of the selection table (sorted by sample id), so the
same selection gives the same bytes. Every rank of a launched run writes its contiguous share of
each bucket as shards of its own (`rank-<rank>.shard.<n>.mds`); rank 0 merges their index.json
entries in rank order, so a bucket holds the same samples in the same order on any world size.

Each bucket is one pass over its members, and every bucket spans about all of the candidates'
shards; a remote pool's shards are downloaded once while they fit the shard cache
(`stages.cache_limit`), else once per bucket. So when they do not fit, the selected samples (a
rank's share of them) are first copied in one pass in id order to a local MDS folder, which the
buckets read instead.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from curation.failpoints import failpoint
from curation.store import rank_files
from curation.store.pool import MDSFolder
from schemas import streams, tables
from schemas.errors import MatesError
from schemas.storage import join, read_parquet, store_for, write_fault, write_parquet


def stage_url(run_url: str, stage: int) -> str:
    return join(run_url, "stages", str(stage))


def stage_committed(run_url: str, stage: int) -> bool:
    return store_for(stage_url(run_url, stage)).exists("_SUCCESS")


def read_stage_marker(run_url: str, stage: int) -> dict:
    """The committed stage's `_SUCCESS` (what it selected, its timings and fit metrics)."""
    return json.loads(store_for(stage_url(run_url, stage)).read_bytes("_SUCCESS"))


PLAN = "index-plan.parquet"   # under <stage>/ranks/: the selection every rank writes its share of


def share_name(rank: int) -> str:
    return f"index-share-{rank:05d}.json"


def _buckets(selection: pa.Table, stage: int) -> list[tuple[str, np.ndarray, float]]:
    """(bucket, its selected sample ids sorted, its stream proportion) per bucket, by name."""
    chosen = selection.filter(selection.column("selected"))
    if chosen.num_rows == 0:
        raise MatesError(f"`selection` of stage {stage} keeps no sample; raise `stages.selection_ratio`.")
    ids = np.asarray(chosen.column("sample_id"))
    weights = np.asarray(chosen.column("weight"))
    # one sort groups the rows by bucket (Group-MATES has a bucket per cluster: thousands at 10^7
    # candidates, where a mask per bucket costs buckets x rows); stable, so a group's first row
    # is the bucket's first in the table, whose weight is its proportion
    names, group = np.unique(np.asarray(chosen.column("bucket").to_pylist(), dtype=object), return_inverse=True)
    rows = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[rows], np.arange(len(names) + 1))
    out = []
    for g, bucket in enumerate(names):
        streams.check_relative_name(bucket, f"selection bucket of stage {stage}")
        members = rows[bounds[g]:bounds[g + 1]]
        out.append((bucket, np.sort(ids[members]), float(weights[members[0]])))
    return out


def _write_mds(source: MDSFolder, at: np.ndarray, columns: dict, out_dir: str, tmp: str, stage: int,
               hashes: list[str] | None = ("sha1",)) -> None:
    """Samples `at` of `source` (the pool, or a local copy of the selection) as one MDS folder."""
    from streaming import MDSWriter

    try:  # local scratch: a full disk here is one line, and nothing of the stage is committed
        write_fault(os.path.join(tmp, "scratch"))
        with MDSWriter(out=out_dir, columns=columns, compression=None, hashes=list(hashes) if hashes else None,
                       progress_bar=False) as writer:
            for sample in source.iter_items(at):
                writer.write({"tokens": sample["tokens"], "sample_id": int(sample["sample_id"])})
    except OSError as exc:
        raise MatesError(f"stage {stage}'s index scratch {tmp} could not be written: {exc.strerror or exc} "
                         f"(errno {exc.errno}); free space under TMPDIR and rerun.") from exc


def _bucket_source(pool: MDSFolder, ids: np.ndarray, n_buckets: int, tmp: str, stage: int):
    """(what the buckets read, the sorted ids of a local copy or None: the pool itself); see the
    module docstring for when the selection is copied first."""
    if n_buckets < 2 or not pool.remote or pool.bytes_of(ids) <= pool.cache_limit():
        return pool, None
    ordered, out = np.sort(ids), os.path.join(tmp, "selected")
    _write_mds(pool, ordered, pool.columns(), out, tmp, stage, hashes=None)   # local scratch: no hash
    return MDSFolder(out), ordered


def write_index_share(selection: pa.Table, *, pool_url: str, run_url: str, stage: int, rank: int = 0,
                      world_size: int = 1) -> dict[str, list[dict]]:
    """This rank's share of every bucket: the contiguous `rank`-th of its sorted members (np.array_split),
    written as MDS shards into index/<bucket>/; returns bucket -> the shards' index.json entries.

    With more than one rank the shards are named `rank-<rank>.shard.<n>.mds` (distinct per rank)
    and the bucket's index.json is rank 0's to merge (`commit_stage_index`); one rank uploads its
    writer's own index.json, as the merge would give."""
    store, pool = store_for(stage_url(run_url, stage)), MDSFolder(pool_url)
    prefix = f"rank-{rank:05d}." if world_size > 1 else ""
    shares, buckets = {}, _buckets(selection, stage)
    mine = {bucket: np.array_split(members, world_size)[rank] for bucket, members, _ in buckets}
    with tempfile.TemporaryDirectory(prefix="mates-index-") as tmp, \
            tempfile.TemporaryDirectory(prefix="mates-staged-") as staged:
        source, staged_ids = _bucket_source(pool, np.concatenate(list(mine.values())), len(buckets), staged, stage)
        for bucket, _, _ in buckets:
            if len(mine[bucket]) == 0:
                shares[bucket] = []
                continue
            out_dir = os.path.join(tmp, bucket)
            at = mine[bucket] if staged_ids is None else np.searchsorted(staged_ids, mine[bucket])
            _write_mds(source, at, pool.columns(), out_dir, tmp, stage)
            with open(os.path.join(out_dir, "index.json"), "rb") as handle:
                index = json.load(handle)
            for shard in index["shards"]:  # shards first, index.json last
                name = shard["raw_data"]["basename"]
                shard["raw_data"]["basename"] = prefix + name
                store.put_file(os.path.join(out_dir, name), "index", bucket, prefix + name)
            if world_size == 1:
                store.put_file(os.path.join(out_dir, "index.json"), "index", bucket, "index.json")
            shares[bucket] = index["shards"]
            failpoint("index")
    return shares


def commit_stage_index(selection: pa.Table, shares: list[dict], *, run_url: str, stage: int, method: str,
                       extra: dict | None = None, started: float | None = None,
                       train_seconds_expected: float | None = None,
                       index_started: float | None = None) -> list[streams.StreamEntry]:
    """Rank 0, every rank's share written: the merged bucket index.json files (several ranks),
    streams.json, streams.yaml, selection.parquet, then `_SUCCESS` (see `write_stage_index`)."""
    selection = tables.conform(selection, tables.SELECTION)
    url = stage_url(run_url, stage)
    store = store_for(url)
    entries, buckets = [], _buckets(selection, stage)
    for bucket, members, proportion in buckets:
        if len(shares) > 1:  # the ranks' shards in rank order: the members' order, as one rank writes it
            merged = [shard for share in shares for shard in share[bucket]]
            store.write_bytes(json.dumps({"shards": merged, "version": 2}, sort_keys=True).encode(),
                              "index", bucket, "index.json")
        entries.append(streams.StreamEntry(name=bucket, path=bucket, remote=join(url, "index", bucket),
                                           proportion=streams.check_proportion(proportion, f"bucket {bucket} weight"),
                                           samples=len(members)))
    store.write_bytes(streams.manifest_json(entries, stage=stage, method=method), "index", "streams.json")
    store.write_bytes(streams.foundry_yaml(entries), "index", "streams.yaml")
    write_parquet(selection, url, "selection.parquet")
    failpoint("commit")
    marker = {"format": "mates-stage", "version": 1, "stage": stage, "method": method,
              "selected": int(sum(len(members) for _, members, _ in buckets)),
              "candidates": int(selection.num_rows), **(extra or {}),
              "seconds_index": time.perf_counter() - (index_started or time.perf_counter())}
    if started is not None:
        marker["curation_seconds"] = time.perf_counter() - started
        if train_seconds_expected:
            marker["train_seconds_expected"] = float(train_seconds_expected)
            marker["curation_share_of_training"] = marker["curation_seconds"] / float(train_seconds_expected)
    store.write_bytes(json.dumps(marker, indent=2).encode(), "_SUCCESS")
    return entries


def write_stage_index(selection: pa.Table | None, *, pool_url: str, run_url: str, stage: int, method: str,
                      rank: int = 0, world_size: int = 1, extra: dict | None = None, started: float | None = None,
                      train_seconds_expected: float | None = None) -> list[streams.StreamEntry] | None:
    """Materialise the selected samples as bucket streams and commit the stage (see above); every
    rank of a launched run calls it, rank 0 with the selection, the others with None.

    Rank 0 writes the selection as <stage>/ranks/index-plan.parquet; each rank writes its share of
    every bucket (`write_index_share`), then <stage>/ranks/index-share-<rank>.json, its shards'
    index.json entries; rank 0 waits for those files (rank_files.wait_for: a rank that failed is
    named, not waited on), merges them and commits. The marker gets `seconds_index` (rank 0's time
    from here) and, given `started` (the job's `time.perf_counter()` at its start),
    `curation_seconds` up to the marker; given the stage's expected training seconds too,
    `curation_share_of_training` = curation / training.
    """
    index_started = time.perf_counter()
    url = stage_url(run_url, stage)
    if rank == 0:
        selection = tables.conform(selection, tables.SELECTION)
        _buckets(selection, stage)  # an empty selection is refused before any rank writes
        if world_size > 1:
            write_parquet(selection, url, rank_files.FOLDER, PLAN)
    else:
        rank_files.wait_for(url, rank_files.FOLDER, PLAN)
        selection = read_parquet(url, rank_files.FOLDER, PLAN)
    share = write_index_share(selection, pool_url=pool_url, run_url=run_url, stage=stage, rank=rank,
                              world_size=world_size)
    store = store_for(join(url, rank_files.FOLDER))
    if rank != 0:
        store.write_bytes(json.dumps(share).encode(), share_name(rank))
        return None
    shares = [share]
    for r in range(1, world_size):
        rank_files.wait_for(url, rank_files.FOLDER, share_name(r))
        shares.append(json.loads(store.read_bytes(share_name(r))))
    return commit_stage_index(selection, shares, run_url=run_url, stage=stage, method=method, extra=extra,
                              started=started, train_seconds_expected=train_seconds_expected,
                              index_started=index_started)


def read_stage_streams(run_url: str, stage: int, *, decommit_damaged: bool = False) -> list[tuple[str, float]]:
    """(bucket URL, proportion) of a committed stage; an uncommitted stage does not exist.

    Every bucket's shards are checked against its index.json (present, the recorded size) first:
    a shard deleted or truncated under the run is one line naming it, not a reader's traceback
    mid-training. With `decommit_damaged` (the stage loop) the stage's `_SUCCESS` is removed too,
    so the rerun redoes its curation from the state before it: the same selection and index."""
    url = stage_url(run_url, stage)
    if not stage_committed(run_url, stage):
        raise MatesError(f"stage {stage} of `{run_url}` is not committed (no _SUCCESS).")
    where = f"{url}/index/streams.json"
    store = store_for(url)
    entries = streams.parse_manifest(store.read_bytes("index", "streams.json"), where)
    for e in entries:
        damage = _index_damage(store, e.path)
        if damage:
            if decommit_damaged:
                store.remove("_SUCCESS")
            fix = ("its _SUCCESS was removed: rerun to redo the stage's curation (same selection)"
                   if decommit_damaged else f"remove `{url}/_SUCCESS` and rerun to redo it")
            raise MatesError(f"`{url}/index/{e.path}/{damage}; stage {stage}'s index was damaged under this run, "
                             f"{fix}.")
    return [(join(url, "index", e.path), e.proportion) for e in entries]


def _index_damage(store, bucket: str) -> str | None:
    """What is wrong with a bucket's shards (`<name>` is missing / truncated ...), or None."""
    try:
        index = json.loads(store.read_bytes("index", bucket, "index.json"))
        shards = [(s["raw_data"]["basename"], int(s["raw_data"]["bytes"])) for s in index["shards"]]
    except (MatesError, ValueError, KeyError, TypeError) as exc:
        return f"index.json` is unreadable ({type(exc).__name__})"
    present = store.file_sizes("index", bucket)
    for name, size in shards:
        streams.check_relative_name(name, f"{bucket}/index.json shard")
        if "/" in name:  # a shard in a sub-folder: not in the bucket's listing, ask for it alone
            seen = store.size("index", bucket, name) if store.exists("index", bucket, name) else None
        else:
            seen = present.get(name)
        if seen is None:
            return f"{name}` is missing"
        if seen != size:
            return f"{name}` has {seen:,} bytes, its index.json says {size:,} (truncated or replaced)"
    return None
