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


def _parallel_predictions(ctx: StageContext, method, rank: int, world_size: int) -> np.ndarray | None:
    """Rank 0 prepares; every rank scores its slice into scores/part-<rank>; rank 0 gets them all.

    No collective spans a phase: the ranks wait on files in the stage folder (`Store.wait_for`),
    so rank 0's probing and fitting may take longer than the process group's timeout."""
    from curation.influence.scoring import shard_for_rank

    url = stage_url(ctx.run_url, ctx.stage)
    store = store_for(url)
    if rank == 0:
        method.prepare(ctx)
        store.write_bytes(b"{}", PREPARED)
    else:
        store.wait_for(PREPARED)
    mine = shard_for_rank(ctx.candidates, rank, world_size)
    write_parquet(_scores_table(mine, method.score_slice(ctx, mine)), url, "scores", _part_name(rank))
    if rank != 0:  # this rank's share of the compute ledger, for rank 0's marker
        counts = {k: v for k, v in ctx.metrics.items() if k.startswith("curation/ledger/") and k.endswith("_tokens")}
        store_for(join(url, "oracle")).write_bytes(json.dumps({"flops": ctx.flops, "counts": counts}).encode(),
                                                   _ledger_name(rank))
        return None
    for r in range(1, world_size):  # the ledger counts every rank's scoring, not rank 0's slice alone
        store.wait_for("scores", _part_name(r))   # one object, written whole (schemas/storage.py)
        store.wait_for("oracle", _ledger_name(r))
        share = json.loads(store_for(join(url, "oracle")).read_bytes(_ledger_name(r)))
        for k, v in share["flops"].items():
            ctx.flops[k] = ctx.flops.get(k, 0.0) + v
        for k, v in share["counts"].items():
            ctx.metrics[k] = ctx.metrics.get(k, 0) + v
    parts = [read_parquet(url, "scores", _part_name(r)) for r in range(world_size)]
    ids = np.concatenate([np.asarray(p.column("sample_id")) for p in parts])
    if not np.array_equal(ids, ctx.candidates):
        raise MatesError(f"the score parts under {url}/scores do not cover the stage's candidates in order.")
    return np.concatenate([np.asarray(p.column("prediction"), dtype=np.float64) for p in parts])


def parallel_oracle(ctx: StageContext, method, rank: int, world_size: int, barrier) -> None:
    """Every rank probes (and runs trajectories for) its share: `method.oracle_part` writes each
    rank's part under stages/<k>/oracle/ and leaves rank 0 holding the merged values
    (curation/oracle/ranks.py). A rank that fails tells the others, which raise rather than wait."""
    barrier()  # rank 0 has cleared the stage's folder before any rank writes a part into it
    method.oracle_part(ctx, rank, world_size, barrier)


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


def run_stage_job(ctx: StageContext, method_name: str, *, rank: int = 0, world_size: int = 1,
                  barrier=_no_barrier) -> dict:
    """Run the job for `ctx.stage` unless it is committed; returns the stage marker fields.

    Every rank of a launched run calls this. A method with `parallel_oracle` deals its probes and
    trajectories to the ranks (`parallel_oracle`); one with `parallel_scoring` scores the
    candidates data-parallel (each rank its `shard_for_rank` slice, written as
    scores/part-<rank>.parquet); everything else (fitting, selection, the index and
    `_SUCCESS`) happens on rank 0, which finally rewrites each part with the global rank and cluster.
    The other ranks return early and wait for `_SUCCESS` in the store (training/stage_loop.py),
    not at a barrier: a boundary may take longer than any collective's timeout.
    """
    if stage_committed(ctx.run_url, ctx.stage):
        return {"skipped": True}
    url = stage_url(ctx.run_url, ctx.stage)
    started = time.perf_counter()
    method = get_method(method_name)
    if rank == 0:
        store_for(url).remove()  # a stage without _SUCCESS is redone from scratch
    if world_size > 1 and getattr(method, "parallel_oracle", False):
        parallel_oracle(ctx, method, rank, world_size, barrier)
    if world_size > 1 and method.parallel_scoring:
        barrier()  # short: no rank may see a marker of the attempt rank 0 just removed
        pred = _parallel_predictions(ctx, method, rank, world_size)
        if rank != 0:
            return {"skipped": False}
    elif rank != 0:
        return {"skipped": False}
    else:
        pred = method.predict(ctx)
    pred = _check_predictions(pred, len(ctx.candidates), method_name)
    delay("curate")  # tests: a boundary longer than the process group's timeout
    t0 = time.perf_counter()
    selection = method.select(ctx, pred)
    if "select" not in ctx.timings:  # a method that clusters times its own phases
        ctx.timings["select"] = time.perf_counter() - t0
    write_audit(ctx, method, pred, selection)
    clusters = getattr(method, "clusters", None)
    order = ranks(pred)
    bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(len(pred)), world_size)])
    for r in range(world_size if method.parallel_scoring else 1):
        lo, hi = (bounds[r], bounds[r + 1]) if method.parallel_scoring else (0, len(pred))
        part = _scores_table(ctx.candidates[lo:hi], pred[lo:hi],
                             None if clusters is None else clusters[lo:hi], order[lo:hi])
        write_parquet(part, url, "scores", _part_name(r))
    extra = {"target": ctx.target, "score_parts": world_size if method.parallel_scoring else 1,
             **{f"seconds_{k}": v for k, v in ctx.timings.items()}, **ctx.metrics,
             # the compute ledger (README "Compute ledger"); a method that records none spends ~0
             **{f"flops_{k}": v for k, v in ctx.flops.items()}, "curation_flops": float(sum(ctx.flops.values()))}
    # write_stage_index adds seconds_index and the totals (curation_seconds, the share of training)
    write_stage_index(selection, pool_url=ctx.data_url.rstrip("/") + "/pool", run_url=ctx.run_url,
                      stage=ctx.stage, method=method_name, extra=extra, started=started,
                      train_seconds_expected=ctx.train_seconds_expected)
    return {"skipped": False, "seconds": time.perf_counter() - started}
