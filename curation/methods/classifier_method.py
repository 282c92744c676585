"""`classifier`: a DCLM-style quality filter, target text vs the stage's candidates.

A fastText-like linear classifier: the mean of learned vectors over a text's hashed word
unigrams + bigrams, then a logistic head; positives are the target set (the one MATES' oracle
uses), negatives the candidates, the classes balanced by weighting. Candidates are kept by the
classifier's logit, highest first (pred = -z-scored logit; the default temperature makes the
Gumbel top-k nearly the plain top-k that DCLM's threshold gives).
"""
from __future__ import annotations

import io

import numpy as np
import torch

from curation.influence.hashed_ngrams import ngram_bags
from curation.methods.base import CurationMethod, StageContext
from curation.methods.texts import TextCache, target_texts
from curation.select.gumbel import standardized
from curation.store.stage_index import stage_url
from schemas.storage import store_for

MODEL_NAME = "classifier.pt"   # under the stage: rank 0's fit, for every rank to score with


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
    """Rank 0 fits the classifier (`prepare`, saved as classifier.pt under the stage); every rank
    scores its slice's logits; rank 0 z-scores them all (`finish`)."""

    name = "classifier"
    n_buckets = 4
    parallel_scoring = True

    def __init__(self):
        self.texts, self.model = TextCache(), None

    def prepare(self, ctx: StageContext) -> None:
        opts = ctx.options
        texts, target = self.texts.fitted_on(ctx), target_texts(ctx, opts.max_target)
        self.model = fit_classifier(target, texts, n_features=opts.n_features, max_n=opts.max_n, dim=opts.dim,
                                    epochs=opts.epochs, lr=opts.lr, seed=ctx.seed + ctx.stage)
        self.fitted_on = (len(target), len(texts))
        buffer = io.BytesIO()
        torch.save(self.model.state_dict(), buffer)
        store_for(stage_url(ctx.run_url, ctx.stage)).write_bytes(buffer.getvalue(), MODEL_NAME)

    def score_slice(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        opts = ctx.options
        if self.model is None:  # a rank other than 0: rank 0's fit
            self.model = NgramClassifier(opts.n_features, opts.dim)
            data = store_for(stage_url(ctx.run_url, ctx.stage)).read_bytes(MODEL_NAME)
            self.model.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
        return classifier_logits(self.model, self.texts.of(ctx, sample_ids), opts.n_features, opts.max_n)

    def finish(self, ctx: StageContext, logits: np.ndarray, world_size: int = 1) -> np.ndarray:
        ctx.log(f"  classifier: trained on {self.fitted_on[0]} target (`{ctx.target}`) vs {self.fitted_on[1]} "
                f"candidate texts; candidate logit mean {logits.mean():+.2f}, std {logits.std():.2f}")
        return -standardized(logits)
