"""Group-MATES: the trajectory oracle (curation/oracle/trajectories.py) and the relational influence model
(curation/influence/relational.py), on a micro GPT-2 and on synthetic embeddings."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from curation.lm.batching import IGNORE, ReferenceSet, collate_samples
from curation.oracle.trajectories import (random_trajectories, run_trajectories, trajectories_table,
                                   trajectory_arrays)
from curation.oracle.probes import model_from_state, probe_influence
from curation.influence.relational import RelationalInfluenceModel, fit_relational_model
from schemas import tables
from schemas.errors import MatesError
from schemas.trajectories import TRAJECTORIES

from tests.oracle_fixtures import MICRO, VOCAB, one_thread, ragged_reference, rel_diff, samples, state  # noqa: F401


@pytest.fixture(scope="module")
def reference() -> ReferenceSet:
    return ragged_reference(8)



# -- the slow reference: deepcopy-free but plainly sequential torch AdamW ------------------------
def _loss64(model, batch) -> torch.Tensor:
    """Mean next-token loss over counted tokens, in the model's dtype (float64 here)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, L, V]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE,
                           reduction="sum") / (batch["labels"][:, 1:] != IGNORE).sum()


@torch.no_grad()
def _ref_loss64(model, reference) -> float:
    total, count = 0.0, 0
    for batch in reference:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE,
                                       reduction="sum"))
        count += int((labels != IGNORE).sum())
    return total / count


def slow_trajectory(state: dict, reference, trajectory: list[dict]) -> np.ndarray:
    """Delta [T] by a fresh float64 model + torch.optim.AdamW loaded with the state's moments/step,
    T real optimizer steps with clip_grad_norm_, L_ref after each."""
    hp = state["hparams"]
    model = model_from_state(state, "cpu", torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    opt.load_state_dict({"param_groups": [{**opt.param_groups[0], "params": list(range(len(params)))}],
                         "state": {i: {"step": torch.as_tensor(float(state["step"][n])),
                                       "exp_avg": state["exp_avg"][n].clone(),
                                       "exp_avg_sq": state["exp_avg_sq"][n].clone()}
                                   for i, n in enumerate(names) if n in state["exp_avg"]}})
    before, out = _ref_loss64(model, reference), []
    for sample in trajectory:
        opt.zero_grad()
        _loss64(model, collate_samples([sample], pad_id=0)).backward()
        torch.nn.utils.clip_grad_norm_(params, hp["grad_clip_norm"])
        opt.step()
        after = _ref_loss64(model, reference)
        out.append(after - before)
        before = after
    return np.asarray(out)


# -- the trajectory oracle -----------------------------------------------------------------------
def test_one_step_trajectories_are_the_one_step_oracle(state, reference, samples):
    """T = 1 is `probe_influence(method="exact")`: same prober, same update, same reference path."""
    few = samples[:5]
    one = run_trajectories(state, reference, [[s] for s in few], pad_id=0, batch=2, dtype=torch.float64)
    exact = probe_influence(state, reference, few, method="exact", pad_id=0, dtype=torch.float64)
    assert one.shape == (5, 1)
    np.testing.assert_allclose(one[:, 0], exact, rtol=1e-9, atol=1e-15)


def test_batched_trajectories_match_sequential_torch_adamw(state, reference, samples):
    """Batched increments equal real sequential AdamW steps to 1e-5 relative (measured ~1e-12).

    float64, as in test_probing: an increment is a difference of two reference losses of ~5.7
    that differ by ~1e-3, so fp32 roundoff alone leaves ~1e-4..1e-3 relative between two correct
    fp32 implementations (seen here: 3e-4). Three trajectories with batch=2 also exercise a ragged last chunk.
    """
    trajs = [samples[0:4], samples[4:8], samples[8:12]]
    fast = run_trajectories(state, reference, trajs, pad_id=0, batch=2, dtype=torch.float64)
    slow = np.stack([slow_trajectory(state, reference, tr) for tr in trajs])
    assert fast.shape == (3, 4) and np.abs(slow).max() > 1e-5
    assert rel_diff(fast, slow) < 1e-5
    # Sequential, not independent: a later step's increment is not x_t's one-step influence from theta_0.
    alone = probe_influence(state, reference, [tr[-1] for tr in trajs], pad_id=0, dtype=torch.float64)
    assert rel_diff(fast[:, -1], alone) > 1e-3


def test_fp32_trajectories_and_progress(state, reference, samples):
    seen = []
    trajs = [samples[0:3], samples[3:6], samples[6:9]]
    fp32 = run_trajectories(state, reference, trajs, pad_id=0, batch=2, progress=seen.append)
    fp64 = run_trajectories(state, reference, trajs, pad_id=0, batch=3, dtype=torch.float64)
    assert seen == [2, 1] and fp32.dtype == np.float64
    assert rel_diff(fp32, fp64) < 5e-3  # fp32 roundoff on differences of ~5.7-sized losses (seen 3e-4)


def test_trajectory_errors_are_mates_errors(state, reference, samples):
    with pytest.raises(MatesError, match="same number"):
        run_trajectories(state, reference, [samples[:2], samples[2:5]], pad_id=0)
    long = {"tokens": np.ones(40, np.uint16), "sample_id": 99}
    with pytest.raises(MatesError, match="at most"):
        run_trajectories(state, reference, [[long]], pad_id=0)
    with pytest.raises(MatesError, match="`batch`"):
        run_trajectories(state, reference, [samples[:1]], pad_id=0, batch=0)
    with pytest.raises(MatesError, match="decoupled"):
        run_trajectories({**state, "hparams": {**state["hparams"], "decoupled": True}}, reference,
                         [samples[:1]], pad_id=0)


def test_random_trajectories():
    candidates = np.arange(100, 140)
    ids = random_trajectories(candidates, 25, 10, np.random.default_rng(3))
    assert ids.shape == (25, 10) and ids.dtype == np.int64
    assert np.isin(ids, candidates).all()
    assert all(len(set(row)) == 10 for row in ids)           # no sample twice in one trajectory
    assert np.array_equal(ids, random_trajectories(candidates, 25, 10, 3))  # a seed works too
    assert random_trajectories(candidates, 0, 4, 0).shape == (0, 4)
    with pytest.raises(MatesError, match="at least T"):
        random_trajectories(np.arange(5), 2, 6, 0)


def test_trajectories_table_roundtrip():
    ids = np.array([[5, 7, 9], [1, 2, 3]])
    inc = np.array([[-0.1, 0.2, 0.0], [0.5, -0.5, 1e-9]])
    table = trajectories_table(ids, inc, stage=2)
    assert table.schema.equals(TRAJECTORIES, check_metadata=True)
    assert table.column("step").to_pylist() == [1, 2, 3, 1, 2, 3]
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    back = pq.read_table(io.BytesIO(buffer.getvalue()))
    tables.check_version(back, TRAJECTORIES, "trajectories.parquet")
    got_ids, got_inc = trajectory_arrays(back.take([5, 0, 3, 1, 4, 2]))  # any row order
    assert np.array_equal(got_ids, ids) and np.array_equal(got_inc, inc)
    with pytest.raises(MatesError, match="n_traj, T"):
        trajectories_table(ids, inc[:, :2], stage=2)
    with pytest.raises(MatesError, match="steps"):
        trajectory_arrays(table.slice(0, 5))


# -- the relational model ------------------------------------------------------------------------
def _loop_marginals(model: RelationalInfluenceModel, h: torch.Tensor) -> torch.Tensor:
    """DESIGN.md 2.4 written as a plain double loop, for one sequence h [T, D]."""
    s, out = model.individual(h), []
    for t in range(h.shape[0]):  # t = (paper's t) - 1 predecessors
        theta = model.alpha * s[t]
        if t:
            theta = theta * (1 - sum(float(h[i] @ h[t]) for i in range(t)) / (model.beta * t))
        out.append(theta)
    return torch.stack(out)


def _model(dim: int, alpha: float, beta: float, seed: int) -> RelationalInfluenceModel:
    rng = np.random.default_rng(seed)
    model = RelationalInfluenceModel(dim, init_head=(rng.normal(size=dim), 0.3))
    with torch.no_grad():
        model.alpha_raw.fill_(alpha)
        model.log_beta.fill_(np.log(beta))
    return model


def test_relational_formula_and_orthogonal_reduction():
    model = _model(8, alpha=1.3, beta=0.7, seed=0)
    assert model.alpha == pytest.approx(1.3) and model.beta == pytest.approx(0.7)
    # Orthogonal h (all similarities 0): every marginal is the individual score times alpha.
    h = torch.eye(8)[torch.randperm(8)][:6].reshape(2, 3, 8)                       # [B=2, T=3, D]
    with torch.no_grad():
        torch.testing.assert_close(model.marginals(h), 1.3 * model.individual(h.reshape(6, 8)).view(2, 3))
        # General h: the vectorised marginals equal the formula's double loop; group = their sum.
        g = F.normalize(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
        want = torch.stack([_loop_marginals(model, g[b]) for b in range(3)])
        torch.testing.assert_close(model.marginals(g), want)
        torch.testing.assert_close(model.group(g), want.sum(-1))
        # Repeating a point discounts it: x, x gives theta_2 = alpha s (1 - 1/beta).
        twice = g[:1, :1].expand(1, 2, 8)
        s = float(model.individual(g[0, :1]))
        assert float(model.marginals(twice)[0, 1]) == pytest.approx(1.3 * s * (1 - 1 / 0.7), rel=1e-5)


def _synthetic(seed: int, *, n: int = 150, T: int = 10, D: int = 16, noise: float = 0.0):
    """Trajectories of clustered unit embeddings (similarities from ~0 to ~0.9, as real h have) and
    increments from the formula with alpha = 1.7, beta = 0.6, b = 0. Each trajectory comes with its
    negation (h -> -h flips s and keeps every h_i.h_j), so the marginals' mean is exactly 0 and the
    fit's z-scoring is a pure rescaling: it should find alpha * std = 1.7 and beta = 0.6."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, D))
    h = centers[rng.integers(0, 6, (n, T))] + 0.7 * rng.normal(size=(n, T, D))
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    h = np.concatenate([h, -h]).astype(np.float32)                                 # [2n, T, D]
    w = rng.normal(size=D)
    planted = RelationalInfluenceModel(D, init_head=(w, 0.0))
    with torch.no_grad():
        planted.alpha_raw.fill_(1.7)
        planted.log_beta.fill_(np.log(0.6))
        y = planted.marginals(torch.as_tensor(h)).double().numpy()                 # [2n, T]
    y = y + noise * y.std() * rng.normal(size=y.shape)
    return h, y, w


def test_fit_recovers_planted_alpha_beta_with_fixed_head():
    """Noise-free data, head fixed to the planted w: alpha and beta are identifiable and the fit
    is a 2-parameter least squares with an exact solution, so only optimiser convergence limits
    it (measured ~1e-5 relative); 1% leaves room for the best-Spearman epoch coming early."""
    h, y, w = _synthetic(0)
    logs = []
    model, metrics = fit_relational_model(h, y, epochs=25, lr=0.05, seed=0, init_head=(w, 0.0),
                                          train_head=False, log=logs.append)
    assert len(logs) == 25 and "held-out spearman" in logs[0]
    assert metrics["label_mean"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["alpha"] * metrics["label_std"] == pytest.approx(1.7, rel=1e-2)
    assert metrics["beta"] == pytest.approx(0.6, rel=1e-2)
    assert metrics["val_spearman"] > 0.999 and metrics["val_trajectories"] == 30
    assert np.array_equal(model.head.weight.detach().numpy().ravel(), w.astype(np.float32))


def test_fit_recovers_beta_and_alpha_w_from_noisy_data():
    """10% label noise, head learnt from scratch: alpha and |w| trade off (only alpha * w is
    identifiable), so check beta and alpha * w. With 3000 steps and SNR 10 the least-squares
    standard error is ~1% per coefficient; measured 0.5-2.5% over four seeds, so 10% is a wide
    but still discriminating bound (the init is 100% off). The held-out Spearman is reported."""
    h, y, w = _synthetic(1, noise=0.1)
    init = np.random.default_rng(9).normal(size=w.shape) * 0.1
    model, metrics = fit_relational_model(h, y, epochs=30, lr=0.05, seed=1, init_head=(init, 0.0),
                                          log=lambda line: None)
    alpha_w = model.head.weight.detach().numpy().ravel() * model.alpha * metrics["label_std"]
    assert np.linalg.norm(alpha_w - 1.7 * w) / np.linalg.norm(1.7 * w) < 0.1
    assert metrics["beta"] == pytest.approx(0.6, rel=0.1)
    assert 0.95 < metrics["val_spearman"] < 1.0
    assert 1 <= metrics["best_epoch"] <= 30


def test_relational_save_load_and_refusals(tmp_path):
    model = _model(8, alpha=-0.4, beta=2.5, seed=3)
    model.label_mean, model.label_std = 0.01, 0.002
    url = str(tmp_path / "relational")
    model.save(url)
    loaded = RelationalInfluenceModel.load(url)
    h = F.normalize(torch.randn(2, 4, 8), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.marginals(h), model.marginals(h))
    assert (loaded.alpha, loaded.label_mean, loaded.label_std) == (model.alpha, 0.01, 0.002)
    config = tmp_path / "relational" / "relational_model.json"
    text = config.read_text()
    config.write_text(text.replace('"version": 1', '"version": 99'))
    with pytest.raises(MatesError, match="version 99"):
        RelationalInfluenceModel.load(url)
    config.write_text(text.replace("mates-relational-model", "mates-influence-model"))
    with pytest.raises(MatesError, match="format"):
        RelationalInfluenceModel.load(url)
    with pytest.raises(MatesError, match="no relational_model.json"):
        RelationalInfluenceModel.load(str(tmp_path / "missing"))


def test_fit_input_errors():
    h = np.zeros((20, 3, 4), np.float32)
    with pytest.raises(MatesError, match="n_traj, T"):
        fit_relational_model(h, np.zeros((20, 2)), epochs=1, lr=0.1, seed=0)
    with pytest.raises(MatesError, match="at least"):
        fit_relational_model(h[:5], np.zeros((5, 3)), epochs=1, lr=0.1, seed=0)
    with pytest.raises(MatesError, match="init_head"):
        fit_relational_model(h, np.zeros((20, 3)), epochs=1, lr=0.1, seed=0, train_head=False)
    with pytest.raises(MatesError, match="init_head"):
        RelationalInfluenceModel(4, init_head=(np.zeros(5), 0.0))


def test_beam_trajectories_find_the_least_predicted_group_influence():
    """With a beam as wide as every ordering (5 * 4 * 3 = 60) the search is exhaustive: it must
    return the ordering of least Σ θ_t among all 3-sequences of its 5 candidates."""
    import itertools

    from curation.oracle.trajectories import beam_trajectories

    model = _model(6, alpha=1.2, beta=0.5, seed=4)
    rng = np.random.default_rng(5)
    emb = F.normalize(torch.as_tensor(rng.normal(size=(5, 6)), dtype=torch.float32), dim=-1)
    cand = np.arange(50, 55)
    with torch.no_grad():
        def group(seq) -> float:
            return float(model.group(emb[list(seq)][None])[0])
        best = min(itertools.permutations(range(5), 3), key=group)
        got = beam_trajectories(model, emb.numpy(), cand, 2, 3, rng, beam=60, candidates=5)
        assert got.shape == (2, 3) and (got == cand[list(best)]).all()
        narrow = beam_trajectories(model, emb.numpy(), cand, 1, 3, 0, beam=1, candidates=5)[0]
        assert group(narrow - 50) >= group(best)                       # greedy: no better than optimal
    wide = F.normalize(torch.as_tensor(np.random.default_rng(6).normal(size=(40, 6)),
                                       dtype=torch.float32), dim=-1)
    ids = beam_trajectories(model, wide.numpy(), np.arange(40), 7, 4, 1, beam=3, candidates=10)
    assert ids.shape == (7, 4) and all(len(set(r)) == 4 for r in ids)
    # Beam 1 over every candidate is the greedy of group_select with this model's s, alpha, beta.
    from curation.select.greedy import greedy_group_select

    with torch.no_grad():
        scores = model.individual(wide)
    greedy = greedy_group_select(scores, wide, 4, alpha=model.alpha, beta=model.beta)
    beam1 = beam_trajectories(model, wide.numpy(), np.arange(40), 1, 4, 2, beam=1, candidates=40)[0]
    assert np.array_equal(beam1, greedy)
    with pytest.raises(MatesError, match="candidates"):
        beam_trajectories(model, wide.numpy(), np.arange(40), 2, 5, 0, candidates=4)


def test_head_from_influence_model_feeds_init_head():
    from curation.influence.relational import head_from_influence_model

    class Stub(torch.nn.Module):  # the InfluenceModel's `head` attribute is all it reads
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 1)

    stub = Stub()
    w, b = head_from_influence_model(stub)
    model = RelationalInfluenceModel(8, init_head=(w, b))
    h = F.normalize(torch.randn(5, 8), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(model.individual(h), stub.head(h).squeeze(-1))
