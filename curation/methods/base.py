"""What every curation method receives, and the shared selection step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curation.selection import gumbel_top_k, score_buckets


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
    device: str = "cpu"
    log: Any = print
    timings: dict = field(default_factory=dict)   # seconds per phase, written to _SUCCESS
    metrics: dict = field(default_factory=dict)   # namespaced figures, written to _SUCCESS


class CurationMethod:
    """Subclasses implement `predict`; `select` may be overridden (Group-MATES does)."""

    name = "base"
    n_buckets = 4

    def predict(self, ctx: StageContext) -> np.ndarray:
        raise NotImplementedError

    def select(self, ctx: StageContext, pred: np.ndarray) -> pa.Table:
        rng = np.random.default_rng([ctx.seed, ctx.stage, 7919])
        mask = gumbel_top_k(pred, ctx.n_select, ctx.options.temperature, rng)
        return score_buckets(ctx.candidates, pred, mask, self.n_buckets)
