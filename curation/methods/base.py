"""What every curation method receives, and the shared selection step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curation.select.gumbel import gumbel_top_k, score_buckets


@dataclass(kw_only=True)
class StageContext:
    """One stage boundary's job: which candidates, how many to keep, from which model state."""

    run_url: str
    data_url: str
    stage: int
    candidates: np.ndarray            # [N] sample ids of this stage's candidate pool
    n_select: int
    seed: int
    options: Any                      # the method's options dataclass (schemas.recipe)
    state_url: str | None = None      # probe state of the model at this boundary (None: initial)
    target: str | None = None         # the target set the method aims at (<data>/targets/<name>)
    audit_by: str = "source"          # catalog column of the stage audit (curation/oracle/stage_audit.py)
    device: str = "cpu"
    log: Any = print
    timings: dict = field(default_factory=dict)   # seconds per phase, written to _SUCCESS
    metrics: dict = field(default_factory=dict)   # namespaced figures, written to _SUCCESS
    flops: dict = field(default_factory=dict)     # FLOPs per phase (curation/methods/ledger.py), to _SUCCESS
    # The training seconds the stage this boundary feeds is expected to take (the previous stage's
    # seconds per batch x this stage's batches; None at stage 0): the denominator of the cost share.
    train_seconds_expected: float | None = None


class CurationMethod:
    """Subclasses implement `predict`; `select` may be overridden (Group-MATES does).

    A method whose per-candidate work is data-parallel sets `parallel_scoring` and implements
    `prepare` (once, on rank 0: what every rank needs, saved under the stage) and `score_slice`
    (on every rank, for its slice of the candidates); `finish` (rank 0) turns every slice's scores
    into predictions where that needs all of them (z-scores); `save_slice` hands rank 0 what else
    a slice gives (Group-MATES: its embeddings). `predict` is then all of it in one process.
    A data-parallel method that also sets `parallel_select` has the ranks other than 0 run
    `select_part` while rank 0 runs `select` (Group-MATES deals its clusters to them).
    """

    name = "base"
    n_buckets = 4
    parallel_scoring = False
    parallel_select = False
    standardize_for_selection = False   # Gumbel τ in units of the predictions' std (see selection.py)

    def predict(self, ctx: StageContext) -> np.ndarray:
        self.prepare(ctx)
        return self.finish(ctx, self.score_slice(ctx, ctx.candidates))

    def prepare(self, ctx: StageContext) -> None:
        raise NotImplementedError

    def score_slice(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def save_slice(self, ctx: StageContext, rank: int) -> None:
        """On a rank other than 0, after `score_slice`: write what rank 0's `finish` reads of the slice."""

    def finish(self, ctx: StageContext, scores: np.ndarray, world_size: int = 1) -> np.ndarray:
        """Rank 0: every candidate's `score_slice` value, in candidate order -> the predictions."""
        return scores

    def select_part(self, ctx: StageContext, rank: int, world_size: int) -> None:
        """On a rank other than 0 (`parallel_select`): its share of the work of rank 0's `select`."""

    def select(self, ctx: StageContext, pred: np.ndarray) -> pa.Table:
        rng = np.random.default_rng([ctx.seed, ctx.stage, 7919])
        mask = gumbel_top_k(pred, ctx.n_select, ctx.options.temperature, rng,
                            standardize=self.standardize_for_selection)
        return score_buckets(ctx.candidates, pred, mask, self.n_buckets)
