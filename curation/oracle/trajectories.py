"""Oracle GROUP influence by trajectories (Group-MATES, DESIGN.md 2.4).

A trajectory x_1..x_T is T SEQUENTIAL one-step updates from the stage's probe state theta_0 (its
parameters, AdamW moments and step count): step t trains on x_t alone from the parameters,
moments and step count that step t-1 left, with the same AdamW and grad clip as the one-step
oracle (curation/oracle/probes.py, DESIGN.md 2.1). After each step the reference-loss increment

    Delta_t = L_ref(theta_t) - L_ref(theta_{t-1})                                          (2.4)

is recorded; sum_t Delta_t is the oracle group influence of the trajectory's set and the Delta_t
are the per-step targets of the relational influence model (curation/influence/relational.py).

Batched over trajectories: a chunk of C trajectories carries its own parameters and moments with a
leading trajectory dimension ({name: [C, *shape]}); each step is one vmapped per-trajectory
gradient (functional_call, no module copies), the AdamW update as tensor maths, and one vmapped
reference forward. The step count is shared: every trajectory has taken the same number of steps.
Nothing is deep-copied or reloaded per step.

The model, its reference batches, the per-sample loss and the vmapped reference loss are those of
`probing.OracleProber` (used, not copied), so a trajectory of T = 1 is exactly its `exact` probe.

Which trajectories: `random_trajectories` (T distinct random candidates each), or
`beam_trajectories`, bootstrapped by the current relational model: a beam search for orderings of
low predicted group influence. `trajectories_table` / `trajectory_arrays` convert to and from the
TRAJECTORIES table (schemas/trajectories.py, `<run>/stages/<k>/trajectories.parquet`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from torch.func import grad, vmap

from curation.lm.batching import collate_samples
from curation.oracle.probes import OracleProber
from schemas.errors import MatesError
from schemas.tables import conform
from schemas.trajectories import TRAJECTORIES


class TrajectoryOracle:
    """Per-step reference-loss increments of batches of trajectories on one probe state.

    `batch` is the number of trajectories advanced together (one vmap); on a CPU the reference
    forward still runs one parameter set at a time (probing.LOGIT_BUDGET), on a GPU many.
    """

    def __init__(self, state: dict, reference, *, batch: int = 16, device="cpu", dtype=torch.float32):
        if int(batch) < 1:
            raise MatesError(f"`batch` must be >= 1 trajectory; got {batch}.")
        self.batch = int(batch)
        # method="exact": its prober validates the state (decoupled AdamW, unknown names) for us.
        self.prober = OracleProber(state, reference, method="exact", probe_batch=self.batch,
                                   device=device, dtype=dtype)
        self.device = device

    @property
    def n_ctx(self) -> int:
        return int(self.prober.model.config.max_position_embeddings)

    def _clip_(self, grads: dict[str, torch.Tensor]) -> None:
        """torch.nn.utils.clip_grad_norm_ per trajectory, in place on {name: [C, *shape]}."""
        clip = self.prober.clip
        if clip <= 0:
            return
        norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()  # [C]
        coef = (clip / (norm + 1e-6)).clamp(max=1.0)                                              # [C]
        for g in grads.values():
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))

    def _adamw_(self, params, exp_avg, exp_avg_sq, grads, t: int) -> None:
        """One torch AdamW step (torch.optim.AdamW's single-tensor maths), in place on the stacks.

        `t` = steps this trajectory has taken, counting this one; torch's step = stored step + t.
        """
        pr = self.prober
        for n, p in params.items():                           # p, m, v, g: [C, *shape]
            g = grads[n]
            step = pr.step[n] + t
            exp_avg[n].lerp_(g, 1 - pr.b1)                     # m <- b1 m + (1 - b1) g
            exp_avg_sq[n].mul_(pr.b2).addcmul_(g, g, value=1 - pr.b2)
            p.mul_(1 - pr.lr * pr.wd)                          # decoupled weight decay first
            denom = (exp_avg_sq[n].sqrt() / (1 - pr.b2 ** step) ** 0.5).add_(pr.eps)
            p.addcdiv_(exp_avg[n], denom, value=-pr.lr / (1 - pr.b1 ** step))

    def increments(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Delta [C, T] for C trajectories of collated samples input_ids, labels [C, T, L]."""
        pr = self.prober
        ids, labels = input_ids.to(self.device), labels.to(self.device)             # [C, T, L]
        n_traj, n_steps = ids.shape[:2]
        params = {n: p.expand(n_traj, *p.shape).clone() for n, p in pr.params.items()}   # [C, *shape]
        exp_avg = {n: m.expand(n_traj, *m.shape).clone() for n, m in pr.exp_avg.items()}
        exp_avg_sq = {n: v.expand(n_traj, *v.shape).clone() for n, v in pr.exp_avg_sq.items()}
        before = torch.full((n_traj,), pr.base_loss(), dtype=pr.dtype, device=self.device)  # [C]
        per_traj_grad = vmap(grad(pr._probe_loss), in_dims=(0, 0, 0))
        out = []
        for t in range(1, n_steps + 1):
            grads = per_traj_grad(params, ids[:, t - 1], labels[:, t - 1])          # {n: [C, *shape]}
            # A data-independent grad comes back from vmap expanded (stride 0): materialise it.
            grads = {n: g.contiguous() for n, g in grads.items()}
            self._clip_(grads)
            self._adamw_(params, exp_avg, exp_avg_sq, grads, t)
            after = pr._ref_loss(params)                                            # [C]
            out.append(after - before)
            before = after
        return torch.stack(out, dim=1)                                              # [C, T]


def _check_trajectories(trajectories: list[list[dict]]) -> int:
    lengths = {len(tr) for tr in trajectories}
    if len(lengths) != 1 or 0 in lengths:
        raise MatesError(f"`trajectories` must all have the same number T >= 1 of samples; got "
                         f"lengths {sorted(lengths)[:5]}.")
    return lengths.pop()


def run_trajectories(state: dict, reference, trajectories: list[list[dict]], *, pad_id: int,
                     device="cpu", batch: int = 16, dtype=torch.float32,
                     progress: Callable[[int], object] | None = None, length: int | None = None) -> np.ndarray:
    """Per-step oracle increments [n_traj, T] (float64) of trajectories of pool samples.

    `trajectories[j]` is a list of T pool samples ({"tokens", "sample_id"}), trained on in order.
    Every sample is padded to the longest one (or `length`, which the ranks of a launched run
    share), so the vmapped shapes never change. `progress`, if
    given, is called with the number of trajectories finished after each chunk.
    """
    if not trajectories:
        return np.zeros((0, 0))
    n_steps = _check_trajectories(trajectories)
    oracle = TrajectoryOracle(state, reference, batch=batch, device=device, dtype=dtype)
    length = max(max(len(s["tokens"]) for tr in trajectories for s in tr), length or 0)
    if length > oracle.n_ctx:
        raise MatesError(f"trajectory samples must be at most the model's {oracle.n_ctx} tokens; "
                         f"got {length}.")
    out = []
    for lo in range(0, len(trajectories), oracle.batch):
        chunk = trajectories[lo:lo + oracle.batch]
        flat = collate_samples([s for tr in chunk for s in tr], pad_id, length=length)   # [C*T, L]
        shape = (len(chunk), n_steps, length)
        delta = oracle.increments(flat["input_ids"].view(shape), flat["labels"].view(shape))
        out.append(delta.double().cpu().numpy())
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out)


def random_trajectories(candidate_ids, n_traj: int, T: int, rng) -> np.ndarray:
    """Sample ids [n_traj, T] (int64): each row T distinct candidates in random order.

    `rng` is a numpy Generator or a seed. Rows are drawn independently, so two trajectories may
    share samples (as random sampling of sequences does); a row never repeats one.
    """
    ids = np.asarray(candidate_ids, dtype=np.int64).ravel()
    rng = np.random.default_rng(rng)
    if int(T) < 1 or int(n_traj) < 0:
        raise MatesError(f"`T` must be >= 1 and `n_traj` >= 0; got T={T}, n_traj={n_traj}.")
    if len(ids) < int(T):
        raise MatesError(f"`candidate_ids` must hold at least T={T} samples for a trajectory of "
                         f"distinct samples; got {len(ids)}.")
    # Generator.choice without replacement draws T of N in O(T) when T << N (no full permutation).
    rows = [rng.choice(ids, size=int(T), replace=False) for _ in range(int(n_traj))]
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, int(T)), dtype=np.int64)


def beam_trajectories(model, emb, candidate_ids, n_traj: int, T: int, rng, *, beam: int = 4,
                      candidates: int = 64) -> np.ndarray:
    """Sample ids [n_traj, T] bootstrapped by the current relational model (DESIGN.md 2.4).

    Each trajectory draws its own `candidates` random rows of `emb` [N, D] (aligned with
    `candidate_ids`), then a beam search of width `beam` over orderings of them keeps the prefixes
    of least predicted group influence Σ θ_t; the best full sequence is returned. The oracle then
    labels these low-influence trajectories, so the model sees more of the region the greedy
    selection will pick from. All trajectories are searched at once (tensors [n_traj, beam, C]).
    """
    ids = np.asarray(candidate_ids, dtype=np.int64).ravel()
    H = torch.as_tensor(np.asarray(emb), dtype=torch.float32)                               # [N, D]
    if H.dim() != 2 or H.shape[0] != len(ids):
        raise MatesError(f"`emb` must be [N, D] with one row per candidate id ({len(ids)}); got "
                         f"shape {tuple(H.shape)}.")
    n_traj, T, beam = int(n_traj), int(T), int(beam)
    C = min(int(candidates), len(ids))
    if T < 1 or beam < 1 or C < T:
        raise MatesError(f"`T` and `beam` must be >= 1 and `candidates` (capped at {len(ids)}) >= T; "
                         f"got T={T}, beam={beam}, candidates={candidates}.")
    if n_traj < 1:
        return np.zeros((0, T), np.int64)
    rng = np.random.default_rng(rng)
    rows = torch.as_tensor(np.stack([rng.choice(len(ids), size=C, replace=False)
                                     for _ in range(n_traj)]))                             # [n, C]
    device = model.head.weight.device
    with torch.no_grad():
        h = H[rows].to(device)                                                              # [n, C, D]
        base = model.alpha * model.individual(h).float()                                    # [n, C] α s
        sim = h @ h.transpose(1, 2)                                                         # [n, C, C]
        n = rows.shape[0]
        acc = torch.zeros(n, 1, C, device=device)  # [n, B, C] Σ_{i in prefix} h_i.h_c; one beam at first
        used = torch.zeros(n, 1, C, dtype=torch.bool, device=device)                        # [n, B, C]
        total = torch.zeros(n, 1, device=device)   # [n, B] predicted group influence of each prefix
        picks = torch.zeros(n, 1, 0, dtype=torch.long, device=device)                       # [n, B, k]

        def follow(x: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
            """x [n, B, ...] -> [n, B', ...]: each new beam's copy of its parent's row."""
            index = parent.view(*parent.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
            return x.gather(1, index)

        for k in range(T):                         # k = prefix length = (paper's t) - 1
            theta = base[:, None] * (1 - acc / (model.beta * k)) if k else base[:, None].expand_as(acc)
            cand = (total[..., None] + theta).masked_fill(used, float("inf")).flatten(1)    # [n, B*C]
            width = min(beam, used.shape[1] * (C - k))     # only unused candidates are finite
            total, flat = cand.topk(width, dim=1, largest=False)                            # [n, B'] sorted
            parent, c = flat // C, flat % C                                                 # [n, B']
            acc = follow(acc, parent) + sim.gather(1, c[..., None].expand(-1, -1, C))       # [n, B', C]
            used = follow(used, parent).scatter(2, c[..., None], True)
            picks = torch.cat([follow(picks, parent), c[..., None]], dim=2)                 # [n, B', k+1]
        best = picks[:, 0].cpu()                                                            # [n, T]
    return ids[rows.gather(1, best).numpy()]


def trajectories_table(ids, increments, stage: int) -> pa.Table:
    """The TRAJECTORIES table of sample ids [n_traj, T] and their increments [n_traj, T]."""
    ids, increments = np.asarray(ids, dtype=np.int64), np.asarray(increments, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != increments.shape:
        raise MatesError(f"`ids` and `increments` must both be [n_traj, T]; got shapes {ids.shape} "
                         f"and {increments.shape}.")
    n_traj, n_steps = ids.shape
    table = pa.table({
        "trajectory": np.repeat(np.arange(n_traj, dtype=np.int32), n_steps),
        "step": np.tile(np.arange(1, n_steps + 1, dtype=np.int32), n_traj),
        "sample_id": ids.ravel(),
        "increment": increments.ravel(),
        "stage": np.full(n_traj * n_steps, int(stage), dtype=np.int32),
    })
    return conform(table, TRAJECTORIES)


def trajectory_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Back from a TRAJECTORIES table to (ids [n_traj, T], increments [n_traj, T]), by (trajectory, step).

    One stage's table: every trajectory must have the steps 1..T.
    """
    table = conform(table, TRAJECTORIES).sort_by([("trajectory", "ascending"), ("step", "ascending")])
    traj = table.column("trajectory").to_numpy()
    step = table.column("step").to_numpy()
    n_traj = len(np.unique(traj))
    if n_traj == 0:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0))
    n_steps = len(traj) // n_traj
    want_step = np.tile(np.arange(1, n_steps + 1), n_traj)
    if len(traj) != n_traj * n_steps or not np.array_equal(step, want_step) \
            or len(np.unique(table.column("stage").to_numpy())) != 1:
        raise MatesError("`trajectories` table must hold one stage whose trajectories all have steps "
                         "1..T; filter it to one stage first.")
    shape = (n_traj, n_steps)
    return (table.column("sample_id").to_numpy().reshape(shape),
            table.column("increment").to_numpy().reshape(shape))
