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
from curation.methods.texts import TextCache, target_texts
from curation.store import rank_files
from curation.store.stage_index import stage_url


def log_ratio(candidates: list[str], target: list[str], n_features: int, max_n: int) -> np.ndarray:
    """log p_target(g) - log p_raw(g) [F] of every hashed n-gram bucket, add-one smoothed."""
    def log_probs(counts: np.ndarray) -> np.ndarray:
        smoothed = counts + 1.0
        return np.log(smoothed / smoothed.sum())

    return log_probs(ngram_counts(target, n_features, max_n)) - log_probs(ngram_counts(candidates, n_features, max_n))


def weights_of(texts: list[str], ratio: np.ndarray, max_n: int) -> np.ndarray:
    """log w [N] of each text: the sum of `ratio` over its n-grams."""
    flat, offsets = ngram_bags(texts, len(ratio), max_n)
    lengths = np.diff(np.append(offsets, len(flat)))                          # [N]
    owner = np.repeat(np.arange(len(texts)), lengths)                         # [sum M]
    return np.bincount(owner, weights=ratio[flat], minlength=len(texts))


def log_importance_weights(candidates: list[str], target: list[str], n_features: int, max_n: int) -> np.ndarray:
    """log w [N] of each candidate under the hashed n-gram models of target and candidates."""
    return weights_of(candidates, log_ratio(candidates, target, n_features, max_n), max_n)


class DsirMethod(CurationMethod):
    """Rank 0 fits both n-gram models over all candidates (`prepare`, saved as ranks/dsir-log-ratio.npy);
    every rank weighs its slice (`score_slice`)."""

    name = "dsir"
    n_buckets = 4
    parallel_scoring = True

    def __init__(self):
        self.texts, self.ratio = TextCache(), None

    def prepare(self, ctx: StageContext) -> None:
        opts = ctx.options
        target = target_texts(ctx, opts.max_target)
        self.ratio = log_ratio(self.texts.fitted_on(ctx), target, opts.n_features, opts.max_n)
        self.n_target = len(target)
        rank_files.write_array(stage_url(ctx.run_url, ctx.stage), "dsir-log-ratio", self.ratio)

    def score_slice(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        if self.ratio is None:  # a rank other than 0: rank 0's fit
            self.ratio = rank_files.read_array(stage_url(ctx.run_url, ctx.stage), "dsir-log-ratio")
        return -weights_of(self.texts.of(ctx, sample_ids), self.ratio, ctx.options.max_n)

    def finish(self, ctx: StageContext, scores: np.ndarray, world_size: int = 1) -> np.ndarray:
        log_w = -scores
        ctx.log(f"  dsir: log importance weight mean {log_w.mean():+.1f}, std {log_w.std():.1f} "
                f"({self.n_target} texts of target `{ctx.target}`, {ctx.options.n_features} hashed buckets)")
        return scores
