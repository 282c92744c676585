"""`random`: the MATES selection path with every prediction equal (pred = 0)."""
from __future__ import annotations

import numpy as np

from curation.methods.base import CurationMethod, StageContext


class RandomMethod(CurationMethod):
    name = "random"
    n_buckets = 1

    def predict(self, ctx: StageContext) -> np.ndarray:
        return np.zeros(len(ctx.candidates))
