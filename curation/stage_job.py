"""One stage boundary's curation job: predict -> select -> scores -> stage index -> _SUCCESS.

Candidate pools follow the MATES paper: a fresh, disjoint slice of the pool per stage, drawn
once from a seeded permutation of all sample ids.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa

from curation.failpoints import delay
from curation.oracle.stage_audit import audit_line, audit_table
from curation.store.catalog import read_catalog
from curation.store.rank_files import read_array, telling_failure, wait_for, write_array
from curation.store.stage_index import stage_committed, stage_url, write_stage_index
from curation.methods import get_method
from curation.methods.base import StageContext
from curation.select.gumbel import ranks
from schemas import tables
from schemas.errors import MatesError
from schemas.storage import join, read_parquet, store_for, write_parquet


def n_selected(n_candidates: int, ratio: float) -> int:
    return max(1, int(round(ratio * n_candidates)))


def _ledger_name(rank: int) -> str:
    return f"ledger-part-{rank:05d}.json"


def _no_barrier() -> None:
    pass


def _scores_table(sample_ids: np.ndarray, pred: np.ndarray, clusters=None, rank=None) -> pa.Table:
    n = len(sample_ids)
    table = pa.table({"sample_id": np.asarray(sample_ids, dtype=np.int64), "prediction": pred.astype(np.float32),
                      "cluster": clusters if clusters is not None else np.full(n, -1, np.int32),
                      "rank": rank if rank is not None else np.full(n, -1, np.int64)})
    return tables.conform(table, tables.SCORES)


def _part_name(rank: int) -> str:
    return f"part-{rank:05d}.parquet"


def _check_predictions(pred: np.ndarray, n: int, method_name: str) -> np.ndarray:
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != (n,) or not np.all(np.isfinite(pred)):
        raise MatesError(f"method `{method_name}` gave {pred.shape} predictions (finite: "
                         f"{bool(np.all(np.isfinite(pred)))}) for {n} candidates.")
    return pred


PREPARED = "_PREPARED"   # rank 0's `prepare` is done (the ranks waiting to score poll for it)


def _additive(metrics: dict) -> dict:
    """The metrics that add up over ranks: the ledger's token counts and the embedding counts."""
    return {k: v for k, v in metrics.items() if (k.startswith("curation/ledger/") and k.endswith("_tokens"))
            or k in ("curation/embed/computed", "curation/embed/reused")}


def _parallel_predictions(ctx: StageContext, method, rank: int, world_size: int) -> np.ndarray | None:
    """Rank 0 prepares; every rank scores its slice into scores/part-<rank>; rank 0 gets them all
    (the raw `score_slice` values, in candidate order; the method's `finish` makes them predictions).

    No collective spans a phase: the ranks wait on files in the stage folder (rank_files.wait_for),
    so rank 0's probing and fitting may take longer than the process group's timeout."""
    from curation.influence.scoring import shard_for_rank

    url = stage_url(ctx.run_url, ctx.stage)
    if rank == 0:
        method.prepare(ctx)
        store_for(url).write_bytes(b"{}", PREPARED)
    else:
        wait_for(url, PREPARED)
    mine = shard_for_rank(ctx.candidates, rank, world_size)
    scores = np.asarray(method.score_slice(ctx, mine), dtype=np.float64)
    if rank != 0:
        _hand_over(ctx, method, url, rank, scores)
    write_parquet(_scores_table(mine, scores), url, "scores", _part_name(rank))   # last: this rank is done
    return _gathered(ctx, url, scores, world_size) if rank == 0 else None


def _hand_over(ctx: StageContext, method, url: str, rank: int, scores: np.ndarray) -> None:
    """What rank 0 needs of this rank's slice: what the method keeps of it (`save_slice`), the exact
    scores (the parquet part holds float32) and this rank's share of the compute ledger."""
    method.save_slice(ctx, rank)
    write_array(url, f"scores-{rank:05d}", scores)
    store_for(join(url, "oracle")).write_bytes(
        json.dumps({"flops": ctx.flops, "counts": _additive(ctx.metrics)}).encode(), _ledger_name(rank))


def _gathered(ctx: StageContext, url: str, scores: np.ndarray, world_size: int) -> np.ndarray:
    """Rank 0: its own slice's scores, then every other rank's once its part is written; the
    ledger then counts every rank's scoring, not rank 0's slice alone."""
    slices = [scores]
    for r in range(1, world_size):
        wait_for(url, "scores", _part_name(r))   # one object, written whole (schemas/storage.py)
        slices.append(read_array(url, f"scores-{r:05d}"))
        share = json.loads(store_for(join(url, "oracle")).read_bytes(_ledger_name(r)))
        for k, v in share["flops"].items():
            ctx.flops[k] = ctx.flops.get(k, 0.0) + v
        for k, v in share["counts"].items():
            ctx.metrics[k] = ctx.metrics.get(k, 0) + v
    ids = np.concatenate([np.asarray(read_parquet(url, "scores", _part_name(r)).column("sample_id"))
                          for r in range(world_size)])
    if not np.array_equal(ids, ctx.candidates) or sum(map(len, slices)) != len(ids):
        raise MatesError(f"the score parts under {url}/scores do not cover the stage's candidates in order.")
    return np.concatenate(slices)


def write_audit(ctx: StageContext, method, pred: np.ndarray, selection: pa.Table) -> pa.Table:
    """stages/<k>/audit.parquet: preferences per catalog group (curation/oracle/stage_audit.py); one log line."""
    ids, keep = np.asarray(selection.column("sample_id")), np.asarray(selection.column("selected"))
    selected = np.zeros(len(ctx.candidates), dtype=bool)
    selected[np.searchsorted(ctx.candidates, ids[keep])] = True   # candidates are sorted
    probe_ids, influence = getattr(method, "probed", (None, None))
    # two columns of the candidates' rows only (curation/store/catalog.py), not the whole catalog
    wanted = ctx.candidates if probe_ids is None else np.union1d(ctx.candidates, probe_ids)
    groups = read_catalog(ctx.data_url, [ctx.audit_by], ids=wanted)
    table = audit_table(groups, stage=ctx.stage, group_by=ctx.audit_by, candidates=ctx.candidates, scores=pred,
                        selected=selected, probe_ids=probe_ids, probe_influence=influence)
    write_parquet(table, stage_url(ctx.run_url, ctx.stage), "audit.parquet")
    line = audit_line(table)
    if line:
        ctx.log(f"  {line}")
    return table


def _predictions(ctx: StageContext, method, rank: int, world_size: int) -> np.ndarray | None:
    """Rank 0's predictions for every candidate (None on the other ranks): scored data-parallel when
    the method allows (`_parallel_predictions`, then its `finish` over all of them), else on rank 0."""
    if world_size > 1 and method.parallel_scoring:
        scores = _parallel_predictions(ctx, method, rank, world_size)
        return None if scores is None else method.finish(ctx, scores, world_size)
    return method.predict(ctx) if rank == 0 else None


def _select_and_record(ctx: StageContext, method, method_name: str, pred: np.ndarray, world_size: int) -> tuple:
    """Rank 0: selection, audit and the scores parts (global rank and cluster); (selection, marker fields)."""
    url = stage_url(ctx.run_url, ctx.stage)
    pred = _check_predictions(pred, len(ctx.candidates), method_name)
    delay("curate")  # tests: a boundary longer than the process group's timeout
    t0 = time.perf_counter()
    selection = method.select(ctx, pred)
    if "select" not in ctx.timings:  # a method that clusters times its own phases
        ctx.timings["select"] = time.perf_counter() - t0
    write_audit(ctx, method, pred, selection)
    clusters = getattr(method, "clusters", None)
    order = ranks(pred)
    parts = world_size if method.parallel_scoring else 1
    bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(len(pred)), parts)])
    for r in range(parts):
        lo, hi = bounds[r], bounds[r + 1]
        part = _scores_table(ctx.candidates[lo:hi], pred[lo:hi],
                             None if clusters is None else clusters[lo:hi], order[lo:hi])
        write_parquet(part, url, "scores", _part_name(r))
    extra = {"target": ctx.target, "score_parts": parts,
             **{f"seconds_{k}": v for k, v in ctx.timings.items()}, **ctx.metrics,
             # the compute ledger (README "Compute ledger"); a method that records none spends ~0
             **{f"flops_{k}": v for k, v in ctx.flops.items()}, "curation_flops": float(sum(ctx.flops.values()))}
    return selection, extra


def run_stage_job(ctx: StageContext, method_name: str, *, rank: int = 0, world_size: int = 1,
                  barrier=_no_barrier) -> dict:
    """Run the job for `ctx.stage` unless it is committed; returns the stage marker fields.

    Every rank of a launched run calls this, and every rank works: a method with `parallel_oracle`
    deals its probes and trajectories to the ranks (`method.oracle_part`, curation/oracle/ranks.py);
    one with `parallel_scoring` scores the candidates data-parallel (each rank its `shard_for_rank`
    slice, written as scores/part-<rank>.parquet); fitting, selection and the audit happen on
    rank 0 (with `parallel_select` the other ranks run `method.select_part` meanwhile: Group-MATES'
    dealt clusters), which rewrites each part with the global rank and cluster; then every rank
    writes its share of the stage index and rank 0 merges and commits it (`write_stage_index`).
    Past the one barrier below, ranks wait on files in the store, never at a collective: a boundary
    may take longer than any collective's timeout. A rank that fails writes ranks/failed-<rank>.txt
    first, and every rank waiting on it raises naming it (curation/store/rank_files.py); the other
    ranks return once rank 0 has committed the stage.
    """
    if stage_committed(ctx.run_url, ctx.stage):
        return {"skipped": True}
    url = stage_url(ctx.run_url, ctx.stage)
    started = time.perf_counter()
    method = get_method(method_name)
    if rank == 0:
        store_for(url).remove()  # a stage without _SUCCESS is redone from scratch
    if world_size > 1:
        barrier()  # short: no rank may see a marker of the attempt rank 0 just removed
    with telling_failure(url, rank):
        if world_size > 1 and getattr(method, "parallel_oracle", False):
            method.oracle_part(ctx, rank, world_size, barrier)   # each rank writes its oracle part
        pred = _predictions(ctx, method, rank, world_size)
        if rank != 0 and world_size > 1 and method.parallel_scoring and getattr(method, "parallel_select", False):
            method.select_part(ctx, rank, world_size)   # its share of rank 0's `select`, through files
        selection, extra = _select_and_record(ctx, method, method_name, pred, world_size) if rank == 0 else (None, None)
        # adds seconds_index and the totals (curation_seconds, the share of training) to the marker
        write_stage_index(selection, pool_url=ctx.data_url.rstrip("/") + "/pool", run_url=ctx.run_url,
                          stage=ctx.stage, method=method_name, rank=rank, world_size=world_size, extra=extra,
                          started=started, train_seconds_expected=ctx.train_seconds_expected)
        if rank != 0:  # returns with the stage committed on every rank, or raises naming the rank that failed
            wait_for(url, "_SUCCESS")
            return {"skipped": False}
    return {"skipped": False, "seconds": time.perf_counter() - started}
