"""Many clusters: hierarchical spherical k-means (a tree of `kmeans.spherical_kmeans` runs).

At k = N / cluster_size a flat k-means compares every row with every centroid (5M rows x 2,500
centroids x 384 is 4.8 TFLOP per pass); a tree of branching <= `BRANCH` compares a row with
~L·b centroids per pass. The top level's groups are independent (`plan_tree`, `cluster_group`),
so a launched run deals them to its ranks (`curation.methods.group_deal`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curation.select.kmeans import CHUNK_ELEMS, spherical_kmeans, unit_rows
from schemas.errors import MatesError

# the tree has ceil(log_BRANCH k) levels. 64, not 32: at 5M rows (k = 2,500) 32 makes 3 levels and
# the mean cosine to the centroid drops 0.549 -> 0.493 for 20% less time (65 s vs 81 s, balanced
# 2-level split); at 1M rows (k = 500) both make 2 levels
BRANCH = 64
# An upper level only deals rows to groups: its centroids are fitted on a sample (UPPER_SAMPLE rows,
# run to convergence), then one pass over all rows assigns them. A second full pass (Lloyd's step
# on all rows) cost 5M rows 8 s and moved the mean cosine 0.5855 -> 0.580 (not better).
UPPER_PASSES = 1
# A leaf of a tree fits its centroids on LEAF_WARM_PER_CLUSTER rows per leaf (to convergence), then
# runs at most LEAF_FULL_PASSES Lloyd passes over all its rows (fewer once LEAF_TOL holds): the
# passes to LEAF_TOL were 5 at 1M rows and 9 at 5M (22 leaves per group), and as leaves per group
# grow with k that made the k-means 7.7x slower for 5x rows. Capped: mean cosine 0.6724 -> 0.6706
# at 1M rows, 0.5855 -> 0.585 at 5M (k = N / 2,000, synthetic fp16; `mates bench select`).
LEAF_FULL_PASSES = 3
LEAF_WARM_PER_CLUSTER = 128
# Width of the top of a 2-level tree: ceil(sqrt(TOP_WIDTH_FACTOR · k)) groups (71 at k = 500, 159
# at k = 2,500). A row then costs ~b + (warm + LEAF_FULL_PASSES) · k / b products, both terms
# ~sqrt(k). Wider tops clustered better in every measurement (1M rows, mean cosine: 27 groups
# 0.655, 50 0.671, 71 0.671, 100 0.674) at more cost per row; 10 is the measured compromise
# (one thread, alone; this machine's run-to-run noise is ~25%).
TOP_WIDTH_FACTOR = 10
UPPER_SAMPLE = 32768    # rows an upper level's centroids are fitted on (at least 64 per cluster)
# a leaf of the tree stops once <= 0.5% of its rows changed in a pass: a tree has k / b leaves (196
# at 5M rows, k = 2,500), and their last Lloyd passes each move a handful of rows at a fixed cost
# per pass; measured on 1M synthetic rows, mean cosine to the centroid 0.6780 -> 0.6776 (k = 2,500)
# and 0.6490 -> 0.6489 (k = 500) for 21% and 32% less k-means CPU
LEAF_TOL = 0.005


def n_clusters_for(n: int, cluster_size: int, n_clusters: int | None = None) -> int:
    """k for `n` candidates: `n_clusters` when given, else n / `cluster_size` (rounded, >= 1); <= n."""
    k = n_clusters if n_clusters is not None else max(1, round(n / cluster_size))
    return max(1, min(int(k), n))


def _split(k: int, sizes: list[int]) -> list[int]:
    """k leaves dealt to groups of `sizes` rows in proportion (largest remainder), each in [1, size]."""
    n = sum(sizes)
    share = [k * s / n for s in sizes]
    out = [min(s, max(1, math.floor(q))) for s, q in zip(sizes, share)]
    order = sorted(range(len(sizes)), key=lambda g: (out[g] - share[g], g))   # furthest below share first
    while sum(out) < k:
        g = next(g for g in order if out[g] < sizes[g])
        out[g] += 1
        order = sorted(range(len(sizes)), key=lambda g: (out[g] - share[g], g))
    while sum(out) > k:
        g = next(g for g in reversed(order) if out[g] > 1)
        out[g] -= 1
        order = sorted(range(len(sizes)), key=lambda g: (out[g] - share[g], g))
    return out


@dataclass
class TreeGroup:
    """One group of the tree's top level: its rows, the leaves it gets and where they start."""
    rows: torch.Tensor      # [n_g] positions in the clustered matrix, ascending
    leaves: int             # clusters of this group (>= 1)
    offset: int             # its first global label
    seed: int               # its sub-tree's seed
    in_tree: bool = False   # under a top level: its leaves run capped passes (LEAF_FULL_PASSES)


def _levels(k: int) -> int:
    return max(1, math.ceil(math.log(k) / math.log(BRANCH) - 1e-9)) if k > 1 else 1


def _top_width(k: int, levels: int) -> int:
    """Groups of the top level: sqrt(TOP_WIDTH_FACTOR k) above 2 levels' leaves,
    else the balanced k^(1/levels) (each sub-tree then picks its own top width)."""
    if levels == 2:
        return min(k, math.ceil(math.sqrt(k * TOP_WIDTH_FACTOR)))
    return min(k, math.ceil(k ** (1 / levels) - 1e-9))


def plan_tree(x: torch.Tensor, k: int, *, seed: int, device: str | torch.device = "cpu", max_iter: int = 20,
              tol: float | None = None, levels: int | None = None) -> tuple[list[TreeGroup], int, float]:
    """The tree's top level over unit rows `x` [N, D]: (groups, levels below the top, leaf tol).

    Each group's sub-tree (`cluster_group`) is independent of the others, so groups can be dealt to
    ranks. Up to `BRANCH` clusters there is no top level: one group of all rows and k leaves.
    `levels`: of the tree from here down (default: from k).
    """
    levels = _levels(k) if levels is None else levels
    if tol is None:
        tol = LEAF_TOL if levels > 1 and k > BRANCH else 0.0
    if levels == 1 or k <= BRANCH:
        return [TreeGroup(torch.arange(x.shape[0]), k, 0, seed)], levels, tol
    b = _top_width(k, levels)
    # an upper level only deals rows to groups (see UPPER_PASSES; Lloyd's on all rows at every level
    # made the tree's cost grow ~9x for 5x rows). Its passes are plain: bounds kept for a second
    # pass cost more than they skipped (b = 109 at 5M rows: 94 s pruned, 64 s plain)
    top = spherical_kmeans(x, b, seed=seed, device=device, max_iter=UPPER_PASSES, tol=tol, warm_iter=max_iter,
                           warm_rows=min(x.shape[0] // 4, max(64 * b, UPPER_SAMPLE)), unit=True, prune=False)[0].long().cpu()
    order = torch.argsort(top, stable=True)                        # rows grouped by top cluster
    sizes = torch.bincount(top, minlength=b).tolist()
    present = [g for g in range(b) if sizes[g]]
    leaves = dict(zip(present, _split(k, [sizes[g] for g in present])))
    groups, start, offset = [], 0, 0
    for g in range(b):
        if sizes[g]:
            groups.append(TreeGroup(order[start:start + sizes[g]], leaves[g], offset,
                                    (seed * 1000003 + g + 1) % (1 << 62), in_tree=True))
            offset += leaves[g]
        start += sizes[g]
    return groups, levels - 1, tol


def cluster_group(x: torch.Tensor, group: TreeGroup, levels: int, tol: float, *, device: str | torch.device = "cpu",
                  max_iter: int = 20, stats: dict | None = None) -> torch.Tensor:
    """Labels [n_g] (long, global: from `group.offset`) of a group's rows `x` [n_g, D] (unit rows)."""
    return _tree(x, group.leaves, levels, group.seed, torch.device(device), max_iter, tol, stats,
                 group.in_tree) + group.offset


def cluster_embeddings(emb: torch.Tensor, k: int, *, seed: int, device: str | torch.device = "cpu",
                       max_iter: int = 20, tol: float | None = None, stats: dict | None = None) -> torch.Tensor:
    """Labels [N] int32 in [0, k) of the rows of `emb` [N, D] (fp32 or fp16, kept as given).

    Up to `BRANCH` clusters: `spherical_kmeans` itself. More: hierarchical k-means (as in Vo et al.
    2024's curation of web-scale data): L = ceil(log_BRANCH k) levels, each a spherical k-means
    inside a cluster of the level above (the top of the last two levels sqrt(10 k) wide, see
    `TOP_WIDTH_FACTOR`; above them k^(1/L)), the leaves dealt to the groups in proportion to their rows. A row is compared with ~L·b centroids per pass instead of k, so
    at k = N / cluster_size the cost grows ~N log N, not ~N² (flat: 5M rows x 2,500 centroids x
    384 is 4.8 TFLOP per pass). The leaves are not flat Lloyd's optimum: within a group they are;
    a row is never moved across groups once the level above placed it. `tol` (see
    `spherical_kmeans`): None is 0 for a flat k-means (Lloyd's fixed point) and `LEAF_TOL` for the
    leaves of a tree. The top level's groups are independent (`plan_tree`, `cluster_group`): a
    launched run deals them to its ranks.
    """
    x = unit_matrix(emb, k)
    device = torch.device(device)
    if stats is not None:
        stats.update(levels=_levels(k), kmeans_runs=0)
    groups, levels, tol = plan_tree(x, k, seed=seed, device=device, max_iter=max_iter, tol=tol)
    if stats is not None and levels > 0 and k > BRANCH:   # the top level's own k-means
        stats["kmeans_runs"] += 1
    labels = torch.empty(x.shape[0], dtype=torch.long, device=device)
    for group in groups:
        rows = group.rows.to(device)
        labels[rows] = cluster_group(x[group.rows.to(x.device)], group, levels, tol, device=device,
                                     max_iter=max_iter, stats=stats)
    return labels.to(torch.int32)


def unit_matrix(emb: torch.Tensor, k: int) -> torch.Tensor:
    """`emb` [N, D] checked and with unit rows (itself when they are), for `plan_tree`."""
    if emb.dim() != 2 or emb.shape[0] == 0:
        raise MatesError(f"`emb` must be a non-empty [N, D] matrix; got shape {tuple(emb.shape)}.")
    n = emb.shape[0]
    if not 1 <= k <= n:
        raise MatesError(f"`k` must be in [1, {n}] (the rows of `emb`); got {k}.")
    return unit_rows(emb, max(256, CHUNK_ELEMS // min(k, BRANCH)))


def _tree(x, k, levels, seed, device, max_iter, tol, stats, in_tree=False) -> torch.Tensor:
    if k == 1:
        return torch.zeros(x.shape[0], dtype=torch.long, device=device)
    if stats is not None:
        stats["kmeans_runs"] += 1
    if levels == 1 or k <= BRANCH:
        warm = LEAF_WARM_PER_CLUSTER * k
        if in_tree and warm <= x.shape[0] // 4:   # a leaf of a tree: fit on a sample, few full passes
            return spherical_kmeans(x, k, seed=seed, device=device, max_iter=min(max_iter, LEAF_FULL_PASSES),
                                    warm_iter=max_iter, warm_rows=warm, tol=tol, unit=True)[0].long()
        return spherical_kmeans(x, k, seed=seed, device=device, max_iter=max_iter, tol=tol, unit=True)[0].long()
    groups, below, _ = plan_tree(x, k, seed=seed, device=device, max_iter=max_iter, tol=tol, levels=levels)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=device)
    for group in groups:
        labels[group.rows.to(device)] = cluster_group(x[group.rows.to(x.device)], group, below, tol, device=device,
                                                      max_iter=max_iter, stats=stats)
    return labels
