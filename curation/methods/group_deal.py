"""Group-MATES' clustering and greedy with the k-means tree's groups dealt to the ranks of a
launched run (issue 22; curation/stage_job.py, curation/methods/group_mates_method.py).

Rank 0 holds every candidate's h(x) and prediction (gathered as before). It fits the tree's top
level (`plan_tree`), deals the groups to the ranks by rows (`deal`) and hands every other rank its
share as `ranks/share-<rank>.npz`: the candidate positions of its groups' rows, those rows' unit
embeddings (fp16 stays fp16) and predictions, each group's leaves, first label and seed, and the
levels below and leaf tol. Then, on every rank at once:

  1. `cluster_share`: each of its groups' sub-tree (`cluster_group`); a rank != 0 writes
     `ranks/labels-<rank>.npy`. A group's labels are global and depend on its rows alone, so rank 0
     assembles exactly one rank's `cluster_embeddings` (`assemble_labels` checks every row came
     back once), drops duplicates and sets per-cluster quotas (DuckDB) as one rank does, and hands
     each rank its rows' eligible labels (-1: a dropped duplicate) and its clusters' quotas, with
     alpha, beta and `interaction` (`ranks/quotas-<rank>.npz`).
  2. `greedy_share`: the greedy inside each of its clusters (a cluster lies inside one group); a
     rank != 0 writes `ranks/picks-<rank>.npy` and rank 0 assembles the mask (`assemble_picks`).
     A share keeps its rows in ascending candidate order, so every cluster's greedy reads the rows
     one rank's `select_per_cluster` reads, in the same order: the same picks.

Ranks wait on these files (`rank_files.wait_for`), never at a collective, and a rank that fails
is named by the one waiting on it (ranks/failed-<rank>.txt). Up to `BRANCH` clusters the tree is
one group (a flat k-means) and all of it lands on rank 0, the other ranks reading an empty share:
the deal is for large k, where the leaves' k-means and the greedy are the cost.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from curation.data.ingest import deal   # the same least-loaded-rank deal as ingest's files
from curation.select.clustering import TreeGroup, cluster_group, plan_tree
from curation.select.greedy import select_per_cluster
from curation.store.rank_files import read_array, read_arrays, wait_for, write_array, write_arrays
from schemas.errors import MatesError


@dataclass
class Share:
    """What one rank clusters and selects: rows of whole groups of the tree's top level."""
    positions: np.ndarray       # [n] int64, ascending: the rows' positions among the candidates
    unit: torch.Tensor          # [n, D] their unit rows, as the k-means reads them
    emb: torch.Tensor           # [n, D] their embeddings, as the greedy reads them (`unit` itself, usually)
    pred: np.ndarray            # [n] float64 their predictions
    groups: list[TreeGroup]     # `rows`: positions into this share, ascending
    levels: int                 # of the tree below the top level
    tol: float                  # the leaves' k-means tol

    def clusters(self) -> set[int]:
        return {c for g in self.groups for c in range(g.offset, g.offset + g.leaves)}


def make_shares(x: torch.Tensor, emb: torch.Tensor, pred: np.ndarray, groups: list[TreeGroup], levels: int,
                tol: float, world_size: int) -> list[Share]:
    """Rank r's `Share` of unit rows `x` [N, D] (`emb` [N, D]: the greedy's rows, often `x` itself)."""
    shares = []
    for hand in deal([len(g.rows) for g in groups], world_size):
        rows = torch.cat([groups[g].rows for g in hand]) if hand else torch.empty(0, dtype=torch.long)
        positions = rows.sort().values                                           # [n]
        if len(positions) == x.shape[0]:   # every row (one group, or one rank): no copy
            unit, mine = x, emb
        else:
            unit = x[positions.to(x.device)]
            mine = unit if emb is x else emb[positions.to(emb.device)]
        # every field of the group but its rows, now positions into this share (`in_tree` too: a
        # dealt leaf must cap its passes as rank 0's own tree would)
        local = [replace(groups[g], rows=torch.searchsorted(positions, groups[g].rows)) for g in hand]
        shares.append(Share(positions.numpy(), unit, mine, np.asarray(pred, dtype=np.float64)[positions.numpy()],
                            local, levels, tol))
    return shares


def _name(kind: str, rank: int) -> str:
    return f"{kind}-{rank:05d}"


def write_share(url: str, rank: int, share: Share) -> None:
    groups = share.groups
    arrays = {"positions": share.positions, "emb": share.emb.cpu().numpy(), "pred": share.pred,
              "group_rows": torch.cat([g.rows for g in groups]).numpy() if groups else np.zeros(0, np.int64),
              "group_sizes": np.array([len(g.rows) for g in groups], np.int64),
              "leaves": np.array([g.leaves for g in groups], np.int64),
              "offsets": np.array([g.offset for g in groups], np.int64),
              "seeds": np.array([g.seed for g in groups], np.int64),
              "in_tree": np.array([g.in_tree for g in groups], np.bool_),
              "levels": np.array(share.levels, np.int64), "tol": np.array(share.tol, np.float64)}
    if share.unit is not share.emb:
        arrays["unit"] = share.unit.cpu().numpy()
    write_arrays(url, _name("share", rank), arrays)


def read_share(url: str, rank: int) -> Share:
    """This rank's share, once rank 0 has written it."""
    wait_for(url, "ranks", f"{_name('share', rank)}.npz")
    a = read_arrays(url, _name("share", rank))
    emb = torch.from_numpy(a["emb"])
    rows = torch.from_numpy(a["group_rows"]).split(a["group_sizes"].tolist())
    groups = [TreeGroup(r, int(n), int(o), int(s), bool(t))
              for r, n, o, s, t in zip(rows, a["leaves"], a["offsets"], a["seeds"], a["in_tree"])]
    return Share(a["positions"], torch.from_numpy(a["unit"]) if "unit" in a else emb, emb, a["pred"], groups,
                 int(a["levels"]), float(a["tol"]))


def cluster_share(share: Share, *, device, max_iter: int = 20) -> np.ndarray:
    """Global labels [n] int32 of the share's rows: each group's sub-tree, as `cluster_embeddings` runs it."""
    labels = torch.empty(len(share.positions), dtype=torch.long, device=device)
    for group in share.groups:
        labels[group.rows.to(device)] = cluster_group(share.unit[group.rows.to(share.unit.device)], group,
                                                      share.levels, share.tol, device=device, max_iter=max_iter)
    return labels.to(torch.int32).cpu().numpy()


def greedy_share(share: Share, eligible: np.ndarray, quotas: dict[int, int], *, alpha: float, beta: float,
                 device, interaction: bool) -> np.ndarray:
    """Candidate positions [m] (ascending) the greedy picks in the share's clusters; `eligible` [n]:
    the rows' labels, -1 for a dropped duplicate (never picked)."""
    mask = select_per_cluster(share.pred, share.emb, eligible, quotas, alpha=alpha, beta=beta, device=device,
                              interaction=interaction)
    return share.positions[mask]


def _quotas_of(share: Share, quotas: dict[int, int]) -> dict[int, int]:
    mine = share.clusters()
    return {c: q for c, q in quotas.items() if c in mine}


def assemble_labels(n: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Labels [n] int32 from (positions, labels) per rank; raises unless every row came back exactly once."""
    for positions, labels in parts:
        if np.shape(labels) != np.shape(positions):
            raise MatesError(f"a rank returned {np.shape(labels)} labels for its {np.shape(positions)} rows.")
    positions = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64)
    seen = np.bincount(positions, minlength=n) if len(positions) else np.zeros(n, np.int64)
    if len(seen) != n or not (seen == 1).all():
        raise MatesError(f"the ranks' cluster labels must cover each of the {n} candidates once; "
                         f"{int((seen[:n] == 0).sum())} missing, {int((seen > 1).sum())} repeated.")
    out = np.empty(n, dtype=np.int32)
    for positions, labels in parts:
        out[positions] = labels
    return out


def assemble_picks(n: int, parts: list[tuple[np.ndarray, np.ndarray, int]]) -> np.ndarray:
    """Mask [n] from (the share's positions, its picks, its quotas' sum) per rank; raises when a rank
    picked a row not its own, a row twice, or other than its quotas."""
    mask = np.zeros(n, dtype=bool)
    for rank, (positions, picks, expected) in enumerate(parts):
        if len(picks) != expected or len(np.unique(picks)) != len(picks) or not np.isin(picks, positions).all():
            raise MatesError(f"share {rank}'s greedy must pick {expected} distinct rows of its own; "
                             f"got {len(picks)} ({len(np.unique(picks))} distinct).")
        mask[picks] = True
    return mask


class DealtSelection:
    """Rank 0's side: the deal, its own share, and the other ranks' results gathered and checked."""

    def __init__(self, url: str, world_size: int, *, device):
        self.url, self.world_size, self.device = url, world_size, device
        self.shares: list[Share] = []
        self.groups = 0

    def labels(self, x: torch.Tensor, emb: torch.Tensor, pred: np.ndarray, k: int, *, seed: int) -> np.ndarray:
        """Labels [N] int32 of unit rows `x` [N, D]: the tree's top level here, its groups on every rank."""
        groups, levels, tol = plan_tree(x, k, seed=seed, device=self.device)
        self.groups = len(groups)
        self.shares = make_shares(x, emb, pred, groups, levels, tol, self.world_size)
        for r in range(1, self.world_size):
            write_share(self.url, r, self.shares[r])
        parts = [(self.shares[0].positions, cluster_share(self.shares[0], device=self.device))]
        for r in [r for r in self.working() if r != 0]:
            wait_for(self.url, "ranks", f"{_name('labels', r)}.npy")
            parts.append((self.shares[r].positions, read_array(self.url, _name("labels", r))))
        return assemble_labels(x.shape[0], parts)

    def working(self) -> list[int]:
        """The ranks dealt at least one group (rank 0's share is clustered even when empty)."""
        return [r for r, s in enumerate(self.shares) if s.groups]

    def mask(self, eligible: np.ndarray, quotas: dict[int, int], *, alpha: float, beta: float,
             interaction: bool) -> np.ndarray:
        """Mask [N] of the greedy's picks, each rank's clusters on that rank."""
        others = [r for r in self.working() if r != 0]
        for r in others:
            share, mine = self.shares[r], _quotas_of(self.shares[r], quotas)
            write_arrays(self.url, _name("quotas", r), {
                "eligible": eligible[share.positions], "clusters": np.array(list(mine), np.int64),
                "quotas": np.array(list(mine.values()), np.int64), "alpha": np.array(alpha, np.float64),
                "beta": np.array(beta, np.float64), "interaction": np.array(interaction)})
        own, mine = self.shares[0], _quotas_of(self.shares[0], quotas)
        parts = [(own.positions, greedy_share(own, eligible[own.positions], mine, alpha=alpha, beta=beta,
                                              device=self.device, interaction=interaction), sum(mine.values()))]
        for r in others:
            wait_for(self.url, "ranks", f"{_name('picks', r)}.npy")
            parts.append((self.shares[r].positions, read_array(self.url, _name("picks", r)),
                          sum(_quotas_of(self.shares[r], quotas).values())))
        return assemble_picks(len(eligible), parts)


def rank_part(url: str, rank: int, *, device) -> bool:
    """A rank != 0's side: wait for its share, cluster it, wait for its quotas, select in its clusters.
    False when it was dealt no group (rank 0 then waits for nothing of it)."""
    share = read_share(url, rank)
    if not share.groups:
        return False
    write_array(url, _name("labels", rank), cluster_share(share, device=device))
    wait_for(url, "ranks", f"{_name('quotas', rank)}.npz")
    q = read_arrays(url, _name("quotas", rank))
    quotas = dict(zip(q["clusters"].tolist(), q["quotas"].tolist()))
    picks = greedy_share(share, q["eligible"], quotas, alpha=float(q["alpha"]), beta=float(q["beta"]),
                         device=device, interaction=bool(q["interaction"]))
    write_array(url, _name("picks", rank), picks)
    return True
