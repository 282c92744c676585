"""The Group-MATES relational influence model (DESIGN.md 2.4) on unit embeddings h(x).

    s(x)  = w . h(x) + b                                         individual score (a linear head)
    θ_1   = α s(x_1)
    θ_t   = α s(x_t) (1 - (1 / (β (t-1))) Σ_{i<t} h_i . h_t),   t >= 2          (marginal of x_t)

α and β are learnable scalars initialised to 1; β = exp(log β) stays positive. The group
influence of a sequence is Σ_t θ_t. Fitted with MSE between θ_t and the z-scored per-step oracle
increments of curation/oracle/trajectories.py (one mean and std over all steps of all trajectories, so
the scale of a step's increment relative to the others is kept), 90/10 split by trajectory, the
epoch with the best held-out Spearman kept. Marginals are on that z scale; `label_mean` and
`label_std` map them back.

Identifiability: α and the scale of (w, b) multiply, so with a trainable head only the product
α (w, b) and β are determined by the data; with a frozen head (`train_head=False`) α is too.

Saved layout (`save(url)`), through the object-store layer (local dir or s3://):

    <url>/relational_model.safetensors   {"weight": [1, D], "bias": [1], "alpha": [1], "log_beta": [1]}
    <url>/relational_model.json          {"format", "version", "dim", "label_mean", ...}: written last
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

FORMAT = "mates-relational-model"
VERSION = 1
CONFIG_NAME = "relational_model.json"
WEIGHTS_NAME = "relational_model.safetensors"
MIN_TRAJECTORIES = 10  # below this a 90/10 split by trajectory holds out nothing to rank


class RelationalInfluenceModel(nn.Module):
    """Linear individual head plus the two relational scalars α, β (DESIGN.md 2.4)."""

    def __init__(self, dim: int, *, init_head=None):
        super().__init__()
        if int(dim) < 1:
            raise MatesError(f"`dim` must be >= 1 (the embedding width); got {dim}.")
        self.dim = int(dim)
        self.head = nn.Linear(self.dim, 1)
        self.alpha_raw = nn.Parameter(torch.ones(()))       # α itself: its sign is free
        self.log_beta = nn.Parameter(torch.zeros(()))       # β = exp(log_beta) > 0, init 1
        self.label_mean, self.label_std = 0.0, 1.0          # increments the marginals are z-scores of
        if init_head is not None:
            self.set_head(*init_head)

    def set_head(self, weight, bias) -> None:
        """Copy an individual head (w [D] or [1, D], b scalar or [1]), e.g. the MATES model's."""
        w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).reshape(-1)
        b = torch.as_tensor(np.asarray(bias, dtype=np.float32)).reshape(-1)
        if w.numel() != self.dim or b.numel() != 1:
            raise MatesError(f"`init_head` must be (w [{self.dim}], b scalar); got w of {w.numel()} "
                             f"and b of {b.numel()} values.")
        with torch.no_grad():
            self.head.weight.copy_(w.view(1, -1))
            self.head.bias.copy_(b)

    @property
    def alpha(self) -> float:
        return float(self.alpha_raw)

    @property
    def beta(self) -> float:
        return float(self.log_beta.exp())

    def individual(self, h: torch.Tensor) -> torch.Tensor:
        """s = w . h + b: h [N, D] -> [N]."""
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1)

    def marginals(self, h: torch.Tensor) -> torch.Tensor:
        """θ_t for every step of each sequence: h [B, T, D] (unit rows) -> [B, T]."""
        h = h.to(self.head.weight.dtype)
        s = self.head(h).squeeze(-1)                                             # [B, T]
        before = torch.cumsum(h, dim=1) - h                                      # [B, T, D] Σ_{i<t} h_i
        sim = (before * h).sum(-1)                                               # [B, T]  Σ_{i<t} h_i.h_t
        k = torch.arange(h.shape[1], device=h.device, dtype=h.dtype)             # [T] = t - 1
        inv = torch.where(k > 0, 1.0 / k.clamp(min=1), torch.zeros_like(k))      # [T] 1/(t-1), 0 at t=1
        return self.alpha_raw * s * (1 - sim * inv / self.log_beta.exp())        # [B, T]

    def group(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted group influence Σ_t θ_t of each sequence: h [B, T, D] -> [B]."""
        return self.marginals(h).sum(-1)

    # -- persistence --------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "dim": self.dim, "alpha": self.alpha,
                "beta": self.beta, "label_mean": float(self.label_mean),
                "label_std": float(self.label_std)}

    def save(self, url: str) -> None:
        """Write weights then the JSON config (the completion marker) to `url`."""
        from safetensors.torch import save

        store = store_for(url)
        store.remove(CONFIG_NAME)  # an overwrite in progress must not look like a finished save
        tensors = {"weight": self.head.weight, "bias": self.head.bias,
                   "alpha": self.alpha_raw.reshape(1), "log_beta": self.log_beta.reshape(1)}
        store.write_bytes(save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}),
                          WEIGHTS_NAME)
        store.write_bytes(json.dumps(self.config_dict(), indent=2).encode(), CONFIG_NAME)

    @classmethod
    def load(cls, url: str) -> "RelationalInfluenceModel":
        """A model written by `save`; refuses another format or version (on CPU, eval mode)."""
        from safetensors.torch import load

        store = store_for(url)
        config = read_stamped_json(store, CONFIG_NAME, fmt=FORMAT, version=VERSION, what="relational model")
        try:
            tensors = load(store.read_bytes(WEIGHTS_NAME))
            model = cls(int(config["dim"]))
            with torch.no_grad():
                model.head.weight.copy_(tensors["weight"].view(1, -1))
                model.head.bias.copy_(tensors["bias"].view(1))
                model.alpha_raw.copy_(tensors["alpha"].view(()))
                model.log_beta.copy_(tensors["log_beta"].view(()))
            model.label_mean, model.label_std = float(config["label_mean"]), float(config["label_std"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MatesError(f"`{url}` holds a damaged relational model ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); refit it.") from exc
        return model.eval()


def head_from_influence_model(influence_model) -> tuple[np.ndarray, float]:
    """(w [D], b) of a MATES InfluenceModel's head, for `init_head`.

    That head reads the unnormalised pooled state, h the normalised one, so s starts scaled by
    1/||pooled|| (about constant across texts); the fit rescales it (through α or w) at once.
    """
    head = influence_model.head
    return head.weight.detach().float().cpu().numpy().ravel(), float(head.bias.detach().reshape(-1)[0])


def _check_fit_inputs(emb: np.ndarray, increments: np.ndarray, epochs: int, batch_size: int) -> None:
    if emb.ndim != 3 or increments.shape != emb.shape[:2]:
        raise MatesError(f"`emb` must be [n_traj, T, D] and `increments` [n_traj, T]; got shapes "
                         f"{emb.shape} and {increments.shape}.")
    if emb.shape[0] < MIN_TRAJECTORIES:
        raise MatesError(f"`emb` must hold at least {MIN_TRAJECTORIES} trajectories to fit and "
                         f"validate a relational model; got {emb.shape[0]}. Raise `n_trajectories`.")
    if not (np.all(np.isfinite(emb)) and np.all(np.isfinite(increments))):
        raise MatesError("`emb` and `increments` must be finite; got NaN or infinite values.")
    if int(epochs) < 1 or int(batch_size) < 1:
        raise MatesError(f"`epochs` and `batch_size` must be >= 1; got {epochs} and {batch_size}.")


def fit_relational_model(emb, increments, *, epochs: int, lr: float, seed: int, init_head=None,
                         train_head: bool = True, batch_size: int = 64, device="cpu",
                         log=print) -> tuple[RelationalInfluenceModel, dict]:
    """Fit θ_t to z-scored oracle increments; DESIGN.md 2.4.

    `emb` [n_traj, T, D]: h of each trajectory's samples in order; `increments` [n_traj, T]: the
    oracle's Delta_t. `init_head` (w, b) starts the individual head (e.g. from the MATES influence
    model); `train_head=False` keeps it fixed and fits α, β alone. Adam on minibatches of
    `batch_size` trajectories. Returns the best epoch by held-out Spearman (marginals against
    increments, all held-out steps together), in eval mode, and its metrics.
    """
    started = time.perf_counter()
    emb = np.asarray(emb, dtype=np.float32)
    increments = np.asarray(increments, dtype=np.float64)
    _check_fit_inputs(emb, increments, epochs, batch_size)
    if init_head is None and not train_head:
        raise MatesError("`train_head` is false but no `init_head` was given; a fixed head needs one.")

    mean, std = float(increments.mean()), float(increments.std())
    target = (increments - mean) / (std if std > 0 else 1.0)                        # [n, T]
    order = np.random.default_rng(seed).permutation(len(emb))
    n_val = max(1, int(round(0.1 * len(emb))))
    val_ix, train_ix = order[:n_val], order[n_val:]

    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        torch.manual_seed(seed)  # head init and shuffling, without reseeding the caller's torch
        model = RelationalInfluenceModel(emb.shape[2], init_head=init_head).to(device)
        model.head.requires_grad_(bool(train_head))
        H = torch.as_tensor(emb, device=device)                                       # [n, T, D]
        Y = torch.as_tensor(target, dtype=torch.float32, device=device)               # [n, T]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=float(lr))
        shuffle = torch.Generator().manual_seed(seed)
        val_y = target[val_ix].ravel()
        best = BestEpoch()
        for epoch in range(1, int(epochs) + 1):
            model.train()
            perm = train_ix[torch.randperm(len(train_ix), generator=shuffle).numpy()]
            losses = []
            for lo in range(0, len(perm), int(batch_size)):
                rows = torch.as_tensor(perm[lo:lo + int(batch_size)], device=device)
                loss = F.mse_loss(model.marginals(H[rows]), Y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss))
            model.eval()
            with torch.no_grad():
                val_pred = model.marginals(H[torch.as_tensor(val_ix, device=device)]).cpu().numpy().ravel()
            rho = spearman(val_pred, val_y)
            mse = float(np.mean((val_pred - val_y) ** 2))
            log(f"relational model epoch {epoch}/{epochs}: train mse {np.mean(losses):.4f}, held-out "
                f"mse {mse:.4f}, held-out spearman {rho:.4f}, alpha {model.alpha:.4f}, beta {model.beta:.4f}")
            best.update(model, epoch=epoch, rho=rho, mse=mse)

    model.load_state_dict(best.state)
    model.head.requires_grad_(True)
    model.label_mean, model.label_std = mean, std
    model.eval()
    metrics = {"val_spearman": best.rho, "val_mse": best.mse, "alpha": model.alpha,
               "beta": model.beta, "train_trajectories": int(len(train_ix)), "val_trajectories": int(n_val),
               "steps": int(emb.shape[1]), "label_mean": mean, "label_std": std,
               "seconds": time.perf_counter() - started, "epochs_run": int(epochs),
               "best_epoch": best.epoch}
    return model, metrics
