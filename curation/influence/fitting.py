"""What the influence-model fits share: Spearman on the held-out split, and keeping the state of
the epoch where it was best (DESIGN.md 2.2: best checkpoint by held-out Spearman)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman's rho; NaN when either side is constant (then no epoch can be preferred on it)."""
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: reported as NaN instead
        return float(spearmanr(pred, target)[0])


class BestEpoch:
    """The model state of the epoch with the highest held-out Spearman (NaN ranks lowest)."""

    def __init__(self):
        self.state: dict | None = None
        self.score, self.rho, self.mse, self.epoch = -math.inf, math.nan, math.nan, 0

    def update(self, model: torch.nn.Module, *, epoch: int, rho: float, mse: float) -> None:
        score = rho if not math.isnan(rho) else -math.inf
        if self.state is None or score > self.score:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.score, self.rho, self.mse, self.epoch = score, rho, mse, epoch
