"""`influence_model.backbone: frozen` (DESIGN.md 2.2): a linear head on stored encoder embeddings.

    pred(x) = w . dropout((e(x) - mu) / sd) + b      e(x): the pooled embedding (curation/influence/embeddings.py)

A linear head rather than an MLP: with a few hundred to a few thousand probes per boundary, 384
inputs are already many parameters, and a linear head makes scoring the pool one matrix product.
The inputs are standardised with the training split's mean and std (MiniLM's pooled features
differ in scale by orders of magnitude, which would make one learning rate fit none of them);
after the fit the standardisation is folded into the weights, so `predict(E) = E @ w + b`.

Fitted like the finetuned model: MSE on z-scored labels, the same 90/10 split (the same seed gives
the same held-out rows), AdamW, the epoch with the best held-out Spearman kept (curation/fit_utils).

Saved layout (`save(url)`), through the object-store layer:

    <url>/head.safetensors    {"weight": [1, D], "bias": [1]}   (standardisation folded in)
    <url>/frozen_head.json    {"format", "version", "dim", "embeddings", "label_mean", ...}: last
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curation.influence.fitting import BestEpoch, spearman
from schemas.errors import MatesError
from schemas.stamps import read_stamped_json
from schemas.storage import store_for

FORMAT = "mates-frozen-head"
VERSION = 1
CONFIG_NAME = "frozen_head.json"
WEIGHTS_NAME = "head.safetensors"
MIN_EXAMPLES = 10  # as for the finetuned model: a 90/10 split needs a held-out set to rank


class FrozenHead(nn.Module):
    """dropout -> Linear(D, 1) over standardised embeddings (standardisation held as buffers)."""

    def __init__(self, dim: int, *, embeddings_key: str = ""):
        super().__init__()
        self.dim, self.embeddings_key = int(dim), embeddings_key
        self.register_buffer("mu", torch.zeros(self.dim))
        self.register_buffer("sd", torch.ones(self.dim))
        self.dropout = nn.Dropout(0.1)
        self.linear = nn.Linear(self.dim, 1)
        self.label_mean, self.label_std = 0.0, 1.0
        self._saved = None                                   # (w, b) in float64 once loaded

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout((emb - self.mu) / self.sd)).squeeze(-1)              # [N]

    def folded(self) -> tuple[np.ndarray, float]:
        """(w [D], b): the head with the standardisation folded in; pred = E @ w + b in eval mode."""
        if getattr(self, "_saved", None) is not None:  # loaded: the float64 weights as saved
            return self._saved
        w = (self.linear.weight.detach().reshape(-1) / self.sd).double()                     # [D]
        b = float(self.linear.bias.detach().double()) - float((w * self.mu.double()).sum())
        return w.cpu().numpy(), b

    def predict(self, emb: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """Predictions [N] (z scale of the fitted labels) as one matrix product: E [N, D] @ w + b.
        `emb` may be fp16 (an fp16 store): `chunk` rows at a time are upcast to float64, so the
        product never holds a float64 copy of all of E (8x an fp16 E's bytes)."""
        w, b = self.folded()
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise MatesError(f"`emb` must be [N, {self.dim}]; got shape {emb.shape}.")
        out = np.empty(emb.shape[0], np.float64)                                             # [N]
        for start in range(0, emb.shape[0], chunk):
            out[start:start + chunk] = emb[start:start + chunk].astype(np.float64) @ w + b
        return out

    # -- persistence --------------------------------------------------------------------------
    def save(self, url: str) -> None:
        from safetensors.torch import save as save_bytes

        store = store_for(url)
        store.remove(CONFIG_NAME)  # an overwrite in progress must not look like a finished save
        w, b = self.folded()
        store.write_bytes(save_bytes({"weight": torch.as_tensor(w, dtype=torch.float64).view(1, -1),
                                      "bias": torch.tensor([b], dtype=torch.float64)}), WEIGHTS_NAME)
        config = {"format": FORMAT, "version": VERSION, "dim": self.dim, "embeddings": self.embeddings_key,
                  "label_mean": float(self.label_mean), "label_std": float(self.label_std)}
        store.write_bytes(json.dumps(config, indent=2).encode(), CONFIG_NAME)

    @classmethod
    def load(cls, url: str) -> "FrozenHead":
        """A head written by `save` (folded: mu = 0, sd = 1), in eval mode."""
        from safetensors.torch import load as load_bytes

        store = store_for(url)
        config = read_stamped_json(store, CONFIG_NAME, fmt=FORMAT, version=VERSION, what="frozen head")
        weights = load_bytes(store.read_bytes(WEIGHTS_NAME))
        head = cls(config["dim"], embeddings_key=config.get("embeddings", ""))
        with torch.no_grad():
            head.linear.weight.copy_(weights["weight"].to(torch.float32))
            head.linear.bias.copy_(weights["bias"].to(torch.float32))
        head._saved = (weights["weight"].reshape(-1).double().numpy(), float(weights["bias"].double()[0]))
        head.label_mean, head.label_std = config["label_mean"], config["label_std"]
        return head.eval()


def fit_frozen_head(emb: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float, batch_size: int,
                    seed: int, weight_decay: float = 0.01, embeddings_key: str = "",
                    log=print) -> tuple[FrozenHead, dict]:
    """Fit a `FrozenHead` on (embedding, oracle label) pairs; returns (head in eval mode, metrics)."""
    started = time.perf_counter()
    emb = np.asarray(emb, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float64)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise MatesError(f"`emb` must be [N, D] and `labels` [N]; got shapes {emb.shape} and {labels.shape}.")
    if len(labels) < MIN_EXAMPLES:
        raise MatesError(f"`labels` must hold at least {MIN_EXAMPLES} examples to fit and validate a "
                         f"frozen head; got {len(labels)}. Raise `n_probes`.")
    if not (np.all(np.isfinite(labels)) and np.all(np.isfinite(emb))):
        raise MatesError("`labels` and `emb` must be finite.")
    for name, value in (("head_epochs", epochs), ("batch_size", batch_size)):
        if int(value) < 1:
            raise MatesError(f"`{name}` must be >= 1; got {value}.")
    label_mean, label_std = float(labels.mean()), float(labels.std())
    target = (labels - label_mean) / (label_std if label_std > 0 else 1.0)                    # [N]
    order = np.random.default_rng(seed).permutation(len(labels))  # the finetuned fit's split
    n_val = max(1, int(round(0.1 * len(labels))))
    val_ix, train_ix = order[:n_val], order[n_val:]

    x = torch.as_tensor(emb)                                                                 # [N, D]
    y = torch.as_tensor(target, dtype=torch.float32)                                         # [N]
    with torch.random.fork_rng(devices=[]):  # seeding the init and dropout leaves the caller's RNG be
        torch.manual_seed(seed)
        head = FrozenHead(emb.shape[1], embeddings_key=embeddings_key)
        head.mu.copy_(x[train_ix].mean(0))
        head.sd.copy_(x[train_ix].std(0).clamp(min=1e-6))
        optimizer = torch.optim.AdamW(head.parameters(), lr=float(lr), weight_decay=float(weight_decay))
        shuffle = torch.Generator().manual_seed(seed)
        best = BestEpoch()
        for epoch in range(1, int(epochs) + 1):
            head.train()
            perm = train_ix[torch.randperm(len(train_ix), generator=shuffle).numpy()]
            for start in range(0, len(perm), int(batch_size)):
                rows = perm[start:start + int(batch_size)]
                loss = F.mse_loss(head(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            head.eval()
            with torch.no_grad():
                val_pred = head(x[val_ix]).numpy()                                           # [n_val]
            rho = spearman(val_pred, target[val_ix])
            best.update(head, epoch=epoch, rho=rho, mse=float(np.mean((val_pred - target[val_ix]) ** 2)))
    head.load_state_dict(best.state)
    head.label_mean, head.label_std = label_mean, label_std
    head.eval()
    log(f"frozen head: best epoch {best.epoch}/{epochs}, held-out spearman {best.rho:.4f}, mse {best.mse:.4f}")
    metrics = {"val_spearman": best.rho, "val_mse": best.mse, "train_size": int(len(train_ix)),
               "val_size": int(n_val), "label_mean": label_mean, "label_std": label_std,
               "seconds": time.perf_counter() - started, "epochs_run": int(epochs), "best_epoch": best.epoch}
    return head, metrics


def cross_validated_spearman(emb: np.ndarray, labels: np.ndarray, *, folds: int = 5, epochs: int,
                             lr: float, batch_size: int, seed: int) -> dict:
    """Spearman of a frozen head on probes it never saw, neither to fit nor to pick its epoch.

    `fit_frozen_head` reports the Spearman of its best epoch on the same held-out split that chose
    that epoch: the maximum of `epochs` noisy estimates, biased upward (on the bench's 51 held-out
    probes by +0.08 on average, up to +0.24; README "Comparison"). Here each of `folds` outer folds
    is scored by a head fitted (its epoch picked on its own inner split) on the other folds.
    Returns the per-fold mean and the Spearman of all out-of-fold predictions pooled.
    """
    emb, labels, folds = np.asarray(emb, dtype=np.float32), np.asarray(labels, dtype=np.float64), int(folds)
    if folds < 2 or len(labels) < folds * MIN_EXAMPLES:
        raise MatesError(f"`folds` must be >= 2 with at least {MIN_EXAMPLES} probes per fold; got "
                         f"{folds} folds of {len(labels)} probes.")
    order = np.random.default_rng(seed).permutation(len(labels))
    pred, per_fold = np.zeros(len(labels)), []
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        head, _ = fit_frozen_head(emb[train], labels[train], epochs=epochs, lr=lr, batch_size=batch_size,
                                  seed=seed + fold, log=lambda _: None)
        pred[test] = head.predict(emb[test])
        per_fold.append(spearman(pred[test], labels[test]))
    return {"cv_spearman": float(np.mean(per_fold)), "cv_spearman_pooled": spearman(pred, labels),
            "folds": folds}
