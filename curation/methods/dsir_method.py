"""`dsir`: data selection with importance resampling (Xie et al. 2023) toward the target set.

Both the target (the target set MATES' oracle uses) and the raw data (this stage's candidates)
are modelled as bags of hashed word unigrams + bigrams; a candidate's log importance weight is
    log w(x) = sum over its n-grams g of  log p_target(g) - log p_raw(g)
with add-one smoothing. DSIR resamples with Gumbel top-k on log w, which is this repo's shared
selection with pred = -log w and temperature 1 (the default).
"""
from __future__ import annotations

import numpy as np

from curation.influence.hashed_ngrams import ngram_bags, ngram_counts
from curation.methods.base import CurationMethod, StageContext
from curation.methods.texts import candidate_texts, target_texts


def log_importance_weights(candidates: list[str], target: list[str], n_features: int, max_n: int) -> np.ndarray:
    """log w [N] of each candidate under the hashed n-gram models of target and candidates."""
    def log_probs(counts: np.ndarray) -> np.ndarray:
        smoothed = counts + 1.0
        return np.log(smoothed / smoothed.sum())

    log_ratio = log_probs(ngram_counts(target, n_features, max_n)) - \
        log_probs(ngram_counts(candidates, n_features, max_n))              # [F]
    flat, offsets = ngram_bags(candidates, n_features, max_n)
    lengths = np.diff(np.append(offsets, len(flat)))                          # [N]
    owner = np.repeat(np.arange(len(candidates)), lengths)                    # [sum M]
    return np.bincount(owner, weights=log_ratio[flat], minlength=len(candidates))


class DsirMethod(CurationMethod):
    name = "dsir"
    n_buckets = 4

    def predict(self, ctx: StageContext) -> np.ndarray:
        opts = ctx.options
        texts = candidate_texts(ctx)
        target = target_texts(ctx, opts.max_target)
        log_w = log_importance_weights(texts, target, opts.n_features, opts.max_n)
        ctx.log(f"  dsir: log importance weight mean {log_w.mean():+.1f}, std {log_w.std():.1f} "
                f"({len(target)} texts of target `{ctx.target}`, {opts.n_features} hashed buckets)")
        return -log_w
