"""Greedy selection under the relational influence model (Group-MATES, DESIGN.md 2.4).

For picks x_1..x_{t-1} already chosen, the marginal influence of a candidate x_t is

    θ_t = s(x_t) · α · (1 - (1 / (β (t-1))) Σ_{i<t} h_i·h_t),      θ_1 = α · s(x_1),

with s the individual predicted influence (lower is better) and h the unit embedding. The greedy
picks argmin θ_1 (= argmin s for α > 0), then repeatedly the candidate of least marginal given
the picks so far. One running vector acc[j] = Σ_{i<t} h_i·h_j gains one row h_last·h per pick,
so a cluster of n rows costs O(quota · n · D) and memory O(n · D); there is no Python double loop.
Ties go to the lowest row index (`argmin` returns the first minimum).

A matvec per pick reads all n·D embeddings for n·D multiply-adds (memory-bound). Instead, when the
pick has no row yet, the rows of the `block` candidates of least marginal right now (the likely
next picks, since θ changes slowly) are computed in one GEMM, and later picks among them reuse
them. The picks are those of the matvec version (the tests check it); only the arithmetic is batched.

`select_per_cluster` runs the greedy inside each cluster (Σ_c O(n_c² D) instead of O(N² D));
`global_greedy` runs it over all rows at once, which is what per-cluster selection approximates.
Torch throughout (it was NumPy float64 on the CPU), so a CUDA `device` runs the same loop on
the GPU. Inputs: numpy arrays or torch tensors, fp16, float32 or float64 embeddings; running sums
and marginals are float64, the block products float32 (fp16 rows upcast one cluster at a time).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from schemas.errors import MatesError


def _check_inputs(scores: torch.Tensor, emb: torch.Tensor, quota: int, alpha: float, beta: float) -> None:
    n = scores.shape[0]
    if scores.dim() != 1 or emb.dim() != 2 or emb.shape[0] != n:
        raise MatesError(f"`scores` [n] and `emb` [n, D] must have the same rows; got shapes "
                         f"{tuple(scores.shape)} and {tuple(emb.shape)}.")
    if not 0 <= quota <= n:
        raise MatesError(f"`quota` must be in [0, {n}] (the rows given); got {quota}.")
    if not (math.isfinite(alpha) and math.isfinite(beta)) or beta == 0:
        raise MatesError(f"`alpha` and `beta` must be finite and `beta` non-zero; got alpha={alpha}, beta={beta}.")
    if n and not bool(torch.isfinite(scores).all()):
        raise MatesError("`scores` contains NaN or infinite predictions; fix the scoring step.")


def _tensor(a, dtype=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.float()
    return t


def greedy_group_select(scores, emb, quota: int, *, alpha: float = 1.0, beta: float = 1.0,
                        block: int = 64, stats: dict | None = None, device=None) -> np.ndarray:
    """Row indices [quota] (int64, in pick order) chosen greedily by relational marginal.

    Torch on `device` (default: `emb`'s; a CUDA device runs it on the GPU): the running sums and
    marginals in float64, the block products in float32 (fp16 rows are upcast here, one cluster
    at a time). `block`: rows of h_j·h computed at once for the candidates of least marginal (see
    the module docstring). `stats`, when given, gets `blocks` (how many) added to it.
    """
    E = _tensor(emb)
    dev = torch.device(device) if device is not None else E.device
    s = _tensor(scores, torch.float64).to(dev)                       # [n]
    E = E.to(dev, torch.float32 if E.dtype in (torch.float16, torch.bfloat16) else E.dtype).contiguous()  # [n, D]
    _check_inputs(s, E, quota, alpha, beta)
    n = s.shape[0]
    base = alpha * s                                                 # [n] θ_1 = α s
    acc = torch.zeros(n, dtype=torch.float64, device=dev)            # [n] Σ_{i<t} h_i·h_j
    open_base = base.clone()                                         # [n] α s, +inf once picked
    theta = torch.empty(n, dtype=torch.float64, device=dev)          # [n] marginal of each row
    width = max(1, min(block, n))
    sims, slot = None, {}                                            # [B, n] rows h_c·h_j, c -> row
    picks = []
    for t in range(quota):              # t = picks so far = (paper's t) - 1
        # θ = α s (1 - acc / (β t)) as α s + α s · acc · (-1 / (β t)): one fused op per pick (the
        # loop is bound by per-op overhead, ~4 ops a pick), picked rows +inf through open_base
        torch.addcmul(open_base, base, acc, value=-1.0 / (beta * t) if t else 0.0, out=theta)
        last = int(torch.argmin(theta))  # the first minimum: ties go to the lowest row
        picks.append(last)
        if t + 1 == quota:
            break
        if last not in slot:            # speculate: the likeliest next picks are the least θ now
            cand = torch.topk(theta, width, largest=False, sorted=False).indices if width < n \
                else torch.arange(n, device=dev)
            cand = torch.cat([cand.new_tensor([last]), cand[cand != last]])[:width]   # ties could leave it out
            sims = (E[cand] @ E.T).double()                          # [B, n] one GEMM, not B matvecs
            slot = {c: i for i, c in enumerate(cand.tolist())}
            if stats is not None:
                stats["blocks"] = stats.get("blocks", 0) + 1
        acc += sims[slot[last]]
        open_base[last] = math.inf
    return np.asarray(picks, dtype=np.int64)


def individual_select(scores, quota: int, *, alpha: float = 1.0) -> np.ndarray:
    """Row indices [quota] in pick order with the interaction term off: θ = α s for every pick, so
    the greedy's picks are the `quota` least α s (ties to the lowest row, as in the greedy)."""
    s = alpha * np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if not 0 <= quota <= s.shape[0]:
        raise MatesError(f"`quota` must be in [0, {s.shape[0]}] (the rows given); got {quota}.")
    return np.argsort(s, kind="stable")[:quota].astype(np.int64)


def select_per_cluster(scores, emb, labels, quotas: dict[int, int], *, alpha: float = 1.0,
                       beta: float = 1.0, block: int = 64, stats: dict | None = None, device=None,
                       interaction: bool = True) -> np.ndarray:
    """Boolean mask [N]: `quotas[c]` rows of each cluster c, chosen by `greedy_group_select` on
    `device` (default: the GPU when there is one, else the CPU).

    Clusters absent from `quotas` (or with quota 0) contribute nothing, so rows labelled -1
    (dropped, e.g. duplicates) are never selected. `emb` may be fp16: a cluster's rows are
    upcast to fp32 when its greedy starts, never the whole matrix. `interaction=False`: each
    cluster's quota of least α s (`individual_select`), the embeddings unused.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    s = _tensor(scores, torch.float64).cpu()                         # [N]
    E = _tensor(emb)                                                 # [N, D]
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if lab.shape != (s.shape[0],) or E.shape[0] != s.shape[0]:
        raise MatesError(f"`scores`, `emb` and `labels` must have the same rows; got {s.shape[0]}, "
                         f"{E.shape[0]} and {lab.shape[0]}.")
    order = np.argsort(lab, kind="stable")                           # rows grouped by cluster, ascending
    present, starts, sizes = np.unique(lab[order], return_index=True, return_counts=True)
    where = {int(c): (int(a), int(b)) for c, a, b in zip(present, starts, sizes)}
    mask = np.zeros(s.shape[0], dtype=bool)
    for cluster, quota in sorted(quotas.items()):
        if quota == 0:
            continue
        start, size = where.get(int(cluster), (0, 0))
        if not 0 <= quota <= size:
            raise MatesError(f"`quotas[{cluster}]` must be in [0, {size}] (the cluster's rows); got {quota}.")
        rows = order[start:start + size]                             # [n_c] in ascending row order
        index = torch.from_numpy(rows)
        if not interaction:
            mask[rows[individual_select(s[index], quota, alpha=alpha)]] = True
            continue
        picks = greedy_group_select(s[index], E[index.to(E.device)], quota, alpha=alpha, beta=beta,
                                    block=block, stats=stats, device=device)
        mask[rows[picks]] = True
    return mask


def global_greedy(scores, emb, quota: int, *, alpha: float = 1.0, beta: float = 1.0, block: int = 64,
                  stats: dict | None = None) -> np.ndarray:
    """Boolean mask [N]: the same greedy over all rows at once (O(quota · N · D))."""
    picks = greedy_group_select(scores, emb, quota, alpha=alpha, beta=beta, block=block, stats=stats)
    mask = np.zeros(len(scores), dtype=bool)
    mask[picks] = True
    return mask
