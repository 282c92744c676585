"""One stage boundary's curation job: predict -> select -> scores -> stage index -> _SUCCESS.

Candidate pools follow the MATES paper: a fresh, disjoint slice of the pool per stage, drawn
once from a seeded permutation of all sample ids.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from curation.index_writer import stage_committed, stage_url, write_stage_index
from curation.methods import get_method
from curation.methods.base import StageContext
from curation.selection import ranks
from schemas import tables
from schemas.errors import MatesError
from schemas.storage import store_for, write_parquet


def candidate_pools(pool_size: int, *, count: int, per_stage: int, seed: int) -> list[np.ndarray]:
    """`count` disjoint candidate pools of `per_stage` sample ids each (sorted within a pool)."""
    need = count * per_stage
    if pool_size < need:
        raise MatesError(f"`stages.pool_per_stage` x `stages.count` = {need} candidates, but the pool "
                         f"holds {pool_size} samples; lower them or ingest more text.")
    order = np.random.default_rng([seed, 104729]).permutation(pool_size)
    return [np.sort(order[k * per_stage:(k + 1) * per_stage]) for k in range(count)]


def n_selected(n_candidates: int, ratio: float) -> int:
    return max(1, int(round(ratio * n_candidates)))


def run_stage_job(ctx: StageContext, method_name: str) -> dict:
    """Run the job for `ctx.stage` unless it is committed; returns the stage marker fields."""
    if stage_committed(ctx.run_url, ctx.stage):
        return {"skipped": True}
    url = stage_url(ctx.run_url, ctx.stage)
    store_for(url).remove()  # a stage without _SUCCESS is redone from scratch
    started = time.perf_counter()
    method = get_method(method_name)
    pred = np.asarray(method.predict(ctx), dtype=np.float64)
    if pred.shape != (len(ctx.candidates),) or not np.all(np.isfinite(pred)):
        raise MatesError(f"method `{method_name}` gave {pred.shape} predictions (finite: "
                         f"{bool(np.all(np.isfinite(pred)))}) for {len(ctx.candidates)} candidates.")
    selection = method.select(ctx, pred)
    clusters = getattr(method, "clusters", None)
    scores = pa.table({"sample_id": ctx.candidates.astype(np.int64), "prediction": pred.astype(np.float32),
                       "cluster": clusters if clusters is not None else np.full(len(pred), -1, np.int32),
                       "rank": ranks(pred)})
    write_parquet(tables.conform(scores, tables.SCORES), url, "scores", "part-00000.parquet")
    seconds = time.perf_counter() - started
    extra = {"curation_seconds": seconds, **{f"seconds_{k}": v for k, v in ctx.timings.items()},
             **ctx.metrics}
    write_stage_index(selection, pool_url=ctx.data_url.rstrip("/") + "/pool", run_url=ctx.run_url,
                      stage=ctx.stage, method=method_name, extra=extra)
    return {"skipped": False, "seconds": time.perf_counter() - started}
