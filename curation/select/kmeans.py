"""Flat spherical k-means over L2-normalised embeddings (Group-MATES, DESIGN.md 2.4).

Influence-aware clustering: points are grouped by cosine similarity of the influence model's
embedding h(x), so each cluster holds points whose relational influence interacts most, and the
greedy selection (`curation.select.greedy`) can run per cluster instead of over all N rows.

* init: seeded greedy k-means++ (D² sampling, D = 1 - cos) on a seeded subsample of at most
  `max(32 k, 16384)` rows (exact k-means++ over all N would be k sequential passes over the data),
  then, when N is large, refined by this same k-means on a seeded subsample of `warm_rows` rows
  (default 64 k): full-data passes then start near a fixed point, so the bounds below prune early.
* assignment: by cosine similarity, chunked matmul [chunk, D] @ [D, k] with a chunk of
  `CHUNK_ELEMS / max(k, D)` rows, so the similarity block and the chunk's rows upcast to fp32
  stay ~16 MB each (with k = 23 the chunk was 182 k rows: 280 MB of fp32 rows).
* update: centroid = normalised mean of its members.
* empty clusters are re-seeded with the points farthest from their own centroid (deterministic).
* stop after `max_iter` passes, or when no assignment changed (at most `tol` · N with `tol` > 0).

Up to `PRUNE_FROM_K` - 1 centroids every pass is textbook Lloyd's (`_plain_pass`): a row's k dot
products cost less than the bookkeeping that would skip them (a tree's 50-cluster leaves at 5M
rows: 81 s plain, 179 s pruned). From `PRUNE_FROM_K` on, passes after the first are Lloyd passes
pruned with distance bounds (exact, not approximate; in
the spirit of Hamerly's and Elkan's algorithms). Per point: its own and second-nearest centroid,
an upper bound u on the chord distance |x - c| to its own, a lower bound l to any other, and a
lower bound l3 to any but those two. When centroids drift by δ, u grows by its own δ and l, l3
shrink by the largest δ. Rows with u <= l cannot move and are skipped. The others get exact
distances to a short list: the k/16 centroids that drifted most (one jumping centroid would
otherwise wreck every bound), their own and, if still needed, their second centroid (points on
the border of two clusters, typical of a topic split in two). When the best of these beats l3
(shrunk only by the largest drift outside the list) the row is settled; only the rest get all k
similarities. Labels therefore equal plain Lloyd's from the same start (up to exact ties; the
tests check it), at a fraction of the work once the centroids settle. Sums are kept
incrementally (moved points only).

The returned centroids are the normalised means of the returned labels. Everything is plain
torch, so a CUDA `device` runs the same code (the init draws on the CPU for reproducibility).
"""
from __future__ import annotations

import contextlib
import math

import torch

from schemas.errors import MatesError

CHUNK_ELEMS = 1 << 22          # similarity block per chunk: 4M floats = 16 MB
_NORM_TOL = 1e-3                # rows whose norm is within this of 1 are used as they are
_SLACK = 1e-5                   # float32 margin: a bound must win by this much to skip a point
PRUNE_FROM_K = 65               # fewer centroids: plain Lloyd passes (see the module docstring)
# rows per cluster of the subsample that refines the start; 256 cut a 1M-row tree's k-means 4% and
# slowed a 5M-row one 15% (its 50-cluster leaves refine on 12,800 rows for ~100,000 clustered)
WARM_PER_CLUSTER = 64


_HALF = (torch.float16, torch.bfloat16)


def unit_rows(emb: torch.Tensor, chunk: int) -> torch.Tensor:
    """Unit rows in `emb`'s own precision: `emb` itself when its rows are unit norm already (no
    copy: 1.5 GB at 1M x 384 fp32), else a normalised copy. fp16 / bf16 rows stay 16-bit (an fp32
    copy of 5M x 384 fp16 rows would be 7.7 GB beside their 3.8 GB); every pass upcasts one chunk
    at a time to fp32 for its matrix product."""
    half = emb.dtype in _HALF
    if emb.dtype == torch.float32 or half:
        tol = 4e-3 if half else _NORM_TOL    # fp16 rounding of a unit row moves its norm ~1e-4
        if all(((emb[i:i + chunk].float().norm(dim=1) - 1).abs() <= tol).all().item()
               for i in range(0, emb.shape[0], chunk)):
            return emb
    out = torch.empty(emb.shape, dtype=emb.dtype if half else torch.float32, device=emb.device)
    for i in range(0, emb.shape[0], chunk):
        out[i:i + chunk] = torch.nn.functional.normalize(emb[i:i + chunk].float(), dim=1)
    return out


def _kmeans_pp(sample: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeds [k, D] from `sample` [m, D] (CPU, float32, unit rows).

    D² sampling (1 - cos is half the squared chord), with 2 + ln k candidates per step of which the
    one that lowers the total potential most is kept (as scikit-learn does): plain k-means++ puts
    two seeds in one well-separated cluster often enough to matter.
    """
    m = sample.shape[0]
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(m, (1,), generator=gen))]
    dist = (1 - sample @ sample[chosen[0]]).clamp_(min=0)           # [m] 1 - cos to nearest seed
    for _ in range(1, k):
        if dist.sum().item() > 0:
            cand = torch.multinomial(dist, trials, replacement=True, generator=gen)   # [L]
        else:   # every point duplicates a seed: draw uniformly
            cand = torch.randint(m, (trials,), generator=gen)
        trial = torch.minimum(dist[None, :], (1 - sample[cand] @ sample.T).clamp_(min=0))  # [L, m]
        best = int(trial.sum(dim=1).argmin())
        chosen.append(int(cand[best]))
        dist = trial[best]
    return sample[torch.tensor(chosen)].clone()                     # [k, D]


def init_centroids(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The seeded k-means++ start [k, D] (CPU) that `spherical_kmeans` uses for unit rows `x`."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    m = min(n, max(32 * k, 16384))
    rows = torch.randperm(n, generator=gen)[:m].sort().values if m < n else torch.arange(n)
    return _kmeans_pp(x[rows.to(x.device)].to("cpu", torch.float32), k, gen)


def _chord(cos: torch.Tensor) -> torch.Tensor:
    """|x - c| for unit vectors from their cosine."""
    return (2 - 2 * cos).clamp_(min=0).sqrt_()


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products [c] of a, b [c, D] (a batched matmul: ~2x faster than (a * b).sum(1))."""
    return torch.bmm(a[:, None, :], b[:, :, None]).flatten()


def _nearest_three(xc: torch.Tensor, centroids: torch.Tensor):
    """Labels of the nearest and second nearest centroid [c], [c]; distances to 1st, 2nd, 3rd [c] x 3."""
    sims = xc @ centroids.T                                         # [c, k]
    top = sims.topk(min(3, centroids.shape[0]), dim=1)
    far = torch.full((len(xc),), float("inf"), device=xc.device)
    second = top.indices[:, 1] if sims.shape[1] > 1 else top.indices[:, 0]
    d = _chord(top.values)                                          # [c, <=3]
    return (top.indices[:, 0], second, d[:, 0], d[:, 1] if d.shape[1] > 1 else far,
            d[:, 2] if d.shape[1] > 2 else far)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    # index_add_ over [k, D] rows is ~25x slower with OpenMP threads than with one on a busy CPU.
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _move(labels, sums, counts, idx, new_labels, xc) -> int:
    """Give rows `idx` (embeddings `xc`) their `new_labels`, keeping sums and counts; how many moved."""
    moved = torch.nonzero(new_labels != labels[idx]).flatten()
    if len(moved):
        old, new, xm = labels[idx[moved]], new_labels[moved], xc[moved]
        with _one_thread(sums.device):
            sums.index_add_(0, new, xm)
            sums.index_add_(0, old, xm, alpha=-1)
        k = counts.shape[0]
        counts += torch.bincount(new, minlength=k) - torch.bincount(old, minlength=k)
        labels[idx[moved]] = new
    return len(moved)


def _pruned_pass(x, device, centroids, drift, st: dict, chunk: int) -> tuple[int, int, int]:
    """One assignment pass after the centroids moved by `drift` [k]: (changed, checked, full rows).

    Rows whose bounds rule out a move are skipped (Hamerly's test). The others ("suspects") are
    compared with the k/16 centroids that moved most ("hot": one jumping centroid would otherwise
    wreck every bound) and with their own; if a move is still possible, with their second
    centroid too; when the best of that short list beats the bound on all other centroids the row
    is settled, otherwise it gets all k similarities.
    """
    labels, second, upper, lower, lower3 = st["labels"], st["second"], st["upper"], st["lower"], st["lower3"]
    k, inf = len(drift), float("inf")
    order = drift.argsort(descending=True)
    n_hot = max(1, k // 16)
    hot = order[:n_hot]                                              # [h]
    tau = drift[order[n_hot]] if n_hot < k else drift.new_zeros(())  # largest drift not hot
    hot_centroids = centroids[hot]                                   # [h, D]
    upper += drift[labels]
    shrink = torch.where(labels == order[0], drift[order[1]], drift[order[0]])   # largest other drift
    suspects = torch.nonzero(upper > lower - shrink - _SLACK).flatten()
    cold_s = lower[suspects] - tau           # [S] vs every other centroid not hot
    rest_s = lower3[suspects] - tau          # [S] vs every centroid but own, second and the hot
    lower -= shrink                          # [N] bounds of the rows skipped; suspects' are reset
    lower3 -= drift[order[0]]
    changed = n_checked = n_full = 0
    step = min(chunk, 4096)
    for j in range(0, len(suspects), step):
        idx, cold, rest = suspects[j:j + step], cold_s[j:j + step], rest_s[j:j + step]
        xs = x[idx.to(x.device)].to(device, torch.float32)           # [m, D]
        own, sec = labels[idx], second[idx]
        d_hot = _chord(xs @ hot_centroids.T)                         # [m, h] exact
        is_own, is_sec = hot[None, :] == own[:, None], hot[None, :] == sec[:, None]
        lower[idx] = torch.minimum(cold, d_hot.masked_fill(is_own, inf).min(dim=1).values)
        lower3[idx] = torch.minimum(rest, d_hot.masked_fill(is_own | is_sec, inf).min(dim=1).values)
        upper[idx] = _chord(_rowdot(xs, centroids[own]))             # exact own distance
        live = torch.nonzero(upper[idx] > lower[idx] - _SLACK).flatten()
        if not len(live):
            continue
        idx, xs, own, sec, rest = idx[live], xs[live], own[live], sec[live], rest[live]
        short = torch.cat([own[:, None], sec[:, None], hot.expand(len(idx), -1)], dim=1)   # [m, 2 + h]
        d = torch.cat([upper[idx, None], _chord(_rowdot(xs, centroids[sec]))[:, None],
                       d_hot[live].masked_fill(is_own[live] | is_sec[live], inf)], dim=1)  # [m, 2 + h]
        best = d.topk(3, dim=1, largest=False)
        settled = best.values[:, 0] <= rest - _SLACK
        a = torch.nonzero(settled).flatten()
        if len(a):
            pick = best.indices[a]
            changed += _move(labels, st["sums"], st["counts"], idx[a], short[a].gather(1, pick[:, :1]).flatten(), xs[a])
            second[idx[a]] = short[a].gather(1, pick[:, 1:2]).flatten()
            upper[idx[a]] = best.values[a, 0]
            lower[idx[a]] = torch.minimum(best.values[a, 1], rest[a])
            lower3[idx[a]] = torch.minimum(best.values[a, 2], rest[a])
            n_checked += len(a)
        b = torch.nonzero(~settled).flatten()
        if len(b):
            new, second[idx[b]], upper[idx[b]], lower[idx[b]], lower3[idx[b]] = _nearest_three(xs[b], centroids)
            changed += _move(labels, st["sums"], st["counts"], idx[b], new, xs[b])
            n_full += len(b)
    return changed, n_checked, n_full


def _plain_pass(x, device, centroids, st: dict, chunk: int, first: bool) -> int:
    """One textbook Lloyd assignment pass: every row gets all k similarities; how many changed.

    For few centroids this beats `_pruned_pass`: a row's k dot products cost less than the
    gathers, row-wise products and bound updates that would skip them (measured in `PRUNE_FROM_K`).
    """
    labels, upper, sums, counts = st["labels"], st["upper"], st["sums"], st["counts"]
    changed = 0
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk].to(device, torch.float32)               # [c, D]
        best, new = (centroids @ xc.T).max(dim=0)                   # [c], [c]: [k, c] is ~1.6x faster than [c, k]
        upper[i:i + chunk] = _chord(best)                           # exact own distance (re-seeding)
        if first:
            labels[i:i + chunk] = new
            with _one_thread(device):
                sums.index_add_(0, new, xc)
            counts += torch.bincount(new, minlength=counts.shape[0])
            changed += len(new)
        else:
            changed += _move(labels, sums, counts, torch.arange(i, i + len(xc), device=device), new, xc)
    return changed


def spherical_kmeans(emb: torch.Tensor, k: int, *, seed: int, max_iter: int = 20,
                     device: str | torch.device = "cpu", tol: float = 0.0, warm_rows: int | None = None,
                     warm_iter: int | None = None, stats: dict | None = None,
                     prune: bool | None = None, unit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of `emb` [N, D] by cosine similarity: (labels [N] int32, centroids [k, D]).

    `tol` stops early once at most that fraction of the N assignments changed in a pass (0: stop
    only when none changed). `warm_rows` (default 64 k; 0 = off) is the subsample that refines the
    k-means++ start; it is skipped when it would exceed N / 4. `stats`, when given, receives
    `iterations` (full-data passes), `changed_last`, `reseeded`, `warm_rows`, `warm_iterations`, and
    per pass `changed`, `checked_rows` (settled by the short list) and `full_rows` (given all k
    similarities). Both outputs live on `device`. `prune` (default: from `PRUNE_FROM_K` centroids)
    picks the bounded passes over plain Lloyd's; both give the same labels (up to exact ties).
    `unit`: the caller vouches that the rows are unit already (the tree's sub-problems).
    """
    if emb.dim() != 2 or emb.shape[0] == 0:
        raise MatesError(f"`emb` must be a non-empty [N, D] matrix; got shape {tuple(emb.shape)}.")
    n, dim = emb.shape
    if not 1 <= k <= n:
        raise MatesError(f"`k` must be in [1, {n}] (the rows of `emb`); got {k}.")
    if max_iter < 1:
        raise MatesError(f"`max_iter` must be >= 1; got {max_iter}.")
    if not 0 <= tol < 1:
        raise MatesError(f"`tol` must be in [0, 1); got {tol}.")
    device = torch.device(device)
    chunk = max(256, CHUNK_ELEMS // max(k, dim))   # [chunk, k] sims and the [chunk, D] fp32 rows: ~16 MB each
    x = emb if unit else unit_rows(emb, chunk)                    # [N, D] unit rows
    prune = k >= PRUNE_FROM_K if prune is None else prune
    warm = WARM_PER_CLUSTER * k if warm_rows is None else warm_rows
    warm_stats: dict = {}
    if 0 < warm <= n // 4:          # refine the start on a subsample (same seed, same algorithm)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        sub = torch.randperm(n, generator=gen)[:warm].sort().values
        _, centroids = spherical_kmeans(x[sub.to(x.device)], k, seed=seed, max_iter=warm_iter or max_iter, device=device,
                                        tol=tol, warm_rows=0, stats=warm_stats, prune=prune, unit=True)
    else:
        warm = 0
        centroids = init_centroids(x, k, seed).to(device)          # [k, D]

    st = {"labels": torch.empty(n, dtype=torch.long, device=device),     # [N] own centroid
          "second": torch.empty(n, dtype=torch.long, device=device),     # [N] second nearest
          "upper": torch.empty(n, dtype=torch.float32, device=device),   # [N] >= |x - own|
          "lower": torch.empty(n, dtype=torch.float32, device=device),   # [N] <= |x - any other|
          "lower3": torch.empty(n, dtype=torch.float32, device=device),  # [N] <= |x - any but own, second|
          "sums": torch.zeros(k, dim, dtype=torch.float32, device=device),  # [k, D]
          "counts": torch.zeros(k, dtype=torch.long, device=device)}        # [k]
    for i in range(0, n, chunk) if prune else ():                   # pass 1: every row
        xc = x[i:i + chunk].to(device, torch.float32)               # [c, D]
        out = _nearest_three(xc, centroids)
        for name, value in zip(("labels", "second", "upper", "lower", "lower3"), out):
            st[name][i:i + chunk] = value
        with _one_thread(device):
            st["sums"].index_add_(0, out[0], xc)
        st["counts"] += torch.bincount(out[0], minlength=k)
    if not prune:
        _plain_pass(x, device, centroids, st, chunk, first=True)
    changed, reseeded, it = n, 0, 1
    history = {"changed": [n], "checked_rows": [0], "full_rows": [n]}
    while True:
        new = torch.nn.functional.normalize(st["sums"], dim=1)      # [k, D] normalised means
        empty = torch.nonzero(st["counts"] == 0).flatten()
        if len(empty):      # re-seed with the points of largest distance bound (deterministic)
            far = torch.topk(st["upper"], len(empty)).indices
            new[empty] = x[far.to(x.device)].to(device, torch.float32)
            reseeded += len(empty)
        drift = (new - centroids).norm(dim=1)                       # [k] how far each centroid moved
        centroids = new
        if it == max_iter or k == 1 or (changed <= tol * n and not len(empty)):
            break
        it += 1
        if prune:
            changed, checked, full = _pruned_pass(x, device, centroids, drift, st, chunk)
        else:
            changed, checked, full = _plain_pass(x, device, centroids, st, chunk, first=False), 0, n
        for name, value in zip(history, (changed, checked, full)):
            history[name].append(value)
    if stats is not None:
        stats.update(iterations=it, changed_last=changed, reseeded=reseeded, warm_rows=warm,
                     warm_iterations=warm_stats.get("iterations", 0), **history)
    return st["labels"].to(torch.int32), centroids
