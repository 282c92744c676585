"""`classifier`: a DCLM-style quality filter, target text vs the stage's candidates.

A fastText-like linear classifier: the mean of learned vectors over a text's hashed word
unigrams + bigrams, then a logistic head; positives are the target set (the one MATES' oracle
uses), negatives the candidates, the classes balanced by weighting. Candidates are kept by the
classifier's logit, highest first (pred = -z-scored logit; the default temperature makes the
Gumbel top-k nearly the plain top-k that DCLM's threshold gives).
"""
from __future__ import annotations

import numpy as np
import torch

from curation.influence.hashed_ngrams import ngram_bags
from curation.methods.base import CurationMethod, StageContext
from curation.methods.texts import candidate_texts, target_texts
from curation.select.gumbel import standardized


class NgramClassifier(torch.nn.Module):
    def __init__(self, n_features: int, dim: int):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(n_features, dim, mode="mean")
        self.head = torch.nn.Linear(dim, 1)

    def forward(self, flat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(flat, offsets)).squeeze(-1)                 # [B] logits


def _bag_batches(texts: list[str], n_features: int, max_n: int, batch: int):
    for start in range(0, len(texts), batch):
        flat, offsets = ngram_bags(texts[start:start + batch], n_features, max_n)
        yield start, torch.as_tensor(flat), torch.as_tensor(offsets)


def fit_classifier(positives: list[str], negatives: list[str], *, n_features: int, max_n: int, dim: int,
                   epochs: int, lr: float, seed: int) -> NgramClassifier:
    """Logistic loss, each class weighted to half the total, Adam, minibatches of 64."""
    torch.manual_seed(seed)
    texts = positives + negatives
    labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    weights = torch.where(labels > 0, 0.5 / max(len(positives), 1), 0.5 / max(len(negatives), 1))
    model = NgramClassifier(n_features, dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        shuffled = [texts[i] for i in order]
        for start, flat, offsets in _bag_batches(shuffled, n_features, max_n, 64):
            idx = torch.as_tensor(order[start:start + len(offsets)])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(flat, offsets), labels[idx], weight=weights[idx], reduction="sum")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def classifier_logits(model: NgramClassifier, texts: list[str], n_features: int, max_n: int) -> np.ndarray:
    out = [model(flat, offsets) for _, flat, offsets in _bag_batches(texts, n_features, max_n, 512)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


class ClassifierMethod(CurationMethod):
    name = "classifier"
    n_buckets = 4

    def predict(self, ctx: StageContext) -> np.ndarray:
        opts = ctx.options
        texts = candidate_texts(ctx)
        target = target_texts(ctx, opts.max_target)
        model = fit_classifier(target, texts, n_features=opts.n_features, max_n=opts.max_n, dim=opts.dim,
                               epochs=opts.epochs, lr=opts.lr, seed=ctx.seed + ctx.stage)
        logits = classifier_logits(model, texts, opts.n_features, opts.max_n)
        ctx.log(f"  classifier: trained on {len(target)} target (`{ctx.target}`) vs {len(texts)} candidate texts; "
                f"candidate logit mean {logits.mean():+.2f}, std {logits.std():.2f}")
        return -standardized(logits)
