"""The oracle prober (curation/oracle/probes.py) against the plain deepcopy + torch AdamW baseline."""
from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import spearmanr

from curation.oracle import probes as probing
from curation.lm.batching import ReferenceSet
from jobs.bench_probe import bench_probe, toy_probe_state
from curation.oracle.probes import (OracleProber, model_from_state, probe_influence, probe_state_from_optimizer,
                              slow_reference_influence)
from schemas import tables
from schemas.errors import MatesError
from schemas.probe_state import load_probe_state, save_probe_state
from schemas.recipe import ModelConfig

from tests.oracle_fixtures import MICRO, VOCAB, one_thread, ragged_reference, rel_diff, samples, state  # noqa: F401


@pytest.fixture(scope="module")
def reference() -> ReferenceSet:
    return ragged_reference(12)



def _with(state: dict, **hparams) -> dict:
    return {**state, "hparams": {**state["hparams"], **hparams}}


@pytest.fixture(scope="module")
def progress_seen() -> list:
    return []


@pytest.fixture(scope="module")
def exact64(state, reference, samples, progress_seen) -> np.ndarray:
    return probe_influence(state, reference, samples, method="exact", probe_batch=5, pad_id=0,
                           dtype=torch.float64, progress=progress_seen.append)


def test_exact_matches_slow_baseline_float64(state, reference, samples, exact64):
    """`exact` equals one real torch AdamW step per probe to 1e-5 relative (measured ~1e-12).

    Run in float64: I(x) is a difference of two reference losses of ~5.7 that differ by ~1e-3, so
    fp32 roundoff alone leaves ~6e-4 relative between two correct fp32 implementations.
    """
    slow = slow_reference_influence(state, reference, samples, pad_id=0, dtype=torch.float64)
    assert np.abs(slow).max() > 1e-5  # a real signal, not two zeros
    assert rel_diff(exact64, slow) < 1e-5


def test_first_order_ranks_like_exact(state, reference, samples, exact64):
    first = probe_influence(state, reference, samples, method="first_order", probe_batch=6, pad_id=0)
    assert spearmanr(first, exact64)[0] >= 0.8
    assert rel_diff(first, exact64) < 0.5  # same scale too: a delta . grad, not just a correlated score


@pytest.mark.parametrize("hparams", [{"grad_clip_norm": 0.0}, {"grad_clip_norm": 0.05},
                                     {"weight_decay": 0.0}, {"weight_decay": 1.0}])
def test_clipping_and_weight_decay_are_applied(state, reference, samples, exact64, hparams):
    """Each setting changes I(x) well beyond roundoff, and `exact` still follows torch's AdamW."""
    varied = _with(state, **hparams)
    few = samples[:4]
    slow = slow_reference_influence(varied, reference, few, pad_id=0, dtype=torch.float64)
    exact = probe_influence(varied, reference, few, method="exact", pad_id=0, dtype=torch.float64)
    assert rel_diff(exact, slow) < 1e-5
    assert rel_diff(exact64[:4], exact) > 1e-3


def test_default_clip_is_active(state, samples):
    """grad_clip_norm=1.0 of the test state really clips the probes' gradients (norms > 1)."""
    prober = OracleProber(state, _one_token_reference(), method="first_order")
    batch = {"input_ids": torch.randint(1, VOCAB, (3, 32)), "labels": torch.randint(1, VOCAB, (3, 32))}
    delta_clipped = prober._delta(batch["input_ids"], batch["labels"])
    prober.clip = 0.0
    delta_raw = prober._delta(batch["input_ids"], batch["labels"])
    name = "transformer.wte.weight"
    assert not torch.allclose(delta_clipped[name], delta_raw[name])


def _one_token_reference() -> ReferenceSet:
    table = pa.table({"input_ids": [[5, 6, 7, 8]], "target_start": [3]})
    return ReferenceSet(tables.conform(table, tables.REFERENCE), pad_id=0, batch_size=1)


def test_chunking_and_progress(state, reference, samples, exact64, progress_seen, monkeypatch):
    """Chunk sizes change nothing: probe chunks, and several probes per vmapped reference forward
    (what a GPU does; a CPU evaluates one parameter set at a time)."""
    assert progress_seen == [5, 5, 2]
    monkeypatch.setitem(probing.LOGIT_BUDGET, "cpu", 2 ** 30)
    one_chunk = probe_influence(state, reference, samples[:6], method="exact", probe_batch=6, pad_id=0,
                                dtype=torch.float64)
    np.testing.assert_allclose(exact64[:6], one_chunk, rtol=1e-9, atol=1e-12)


def test_probe_state_roundtrip_and_model_rebuild(state, tmp_path):
    save_probe_state(state, str(tmp_path), "stage-1-probe.pt")
    loaded = load_probe_state(str(tmp_path), "stage-1-probe.pt")
    assert loaded["format"] == "mates-probe-state" and loaded["hparams"]["grad_clip_norm"] == 1.0
    ids = torch.randint(1, VOCAB, (2, 16))
    want = model_from_state(state, "cpu")(input_ids=ids).logits
    assert torch.equal(model_from_state(loaded, "cpu")(input_ids=ids).logits, want)
    # Only named_parameters() names (the tied lm_head.weight dropped) still loads, tied.
    params_only = {**loaded, "model": {k: v for k, v in loaded["model"].items() if k != "lm_head.weight"}}
    model = model_from_state(params_only, "cpu")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model(input_ids=ids).logits, want)


def test_probe_state_from_optimizer_refuses_other_optimizers():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(MatesError, match="`optimizer` must be"):
        probe_state_from_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_clip_norm=1.0,
                                   stage=1)


def test_gpt_neox_exact_matches_slow(reference, samples):
    neox = toy_probe_state(ModelConfig(name="gpt_neox", d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
                           VOCAB, train_steps=3)
    slow = slow_reference_influence(neox, reference, samples[:4], pad_id=0, dtype=torch.float64)
    exact = probe_influence(neox, reference, samples[:4], method="exact", pad_id=0, dtype=torch.float64)
    assert rel_diff(exact, slow) < 1e-5


def test_user_errors_are_mates_errors(state, reference, samples):
    with pytest.raises(MatesError, match="`method`"):
        OracleProber(state, reference, method="second_order")
    with pytest.raises(MatesError, match="decoupled"):
        OracleProber(_with(state, decoupled=True), reference)
    with pytest.raises(MatesError, match="at most"):
        probe_influence(state, reference, [{"tokens": np.ones(40, np.uint16), "sample_id": 0}], pad_id=0)
    bad = {**state, "exp_avg": {**state["exp_avg"], "nope.weight": torch.zeros(1)}}
    with pytest.raises(MatesError, match="lacks"):
        OracleProber(bad, reference)


def test_bench_probe_reports_every_metric_and_leaves_the_state_untouched(state, reference, samples):
    before = copy.deepcopy(state)
    out = bench_probe(state, reference, samples[:3], pad_id=0, probe_batch=3)
    for key in ("exact_probes_per_s", "first_order_probes_per_s", "slow_probes_per_s", "exact_speedup",
                "first_order_speedup", "spearman_first_order_vs_exact", "max_rel_diff_exact_vs_slow"):
        assert np.isfinite(out[f"curation/probe/{key}"])
    assert out["curation/probe/max_rel_diff_exact_vs_slow"] < 5e-3  # fp32
    # The baseline once wrote its AdamW step into the stored moments (load_state_dict aliases).
    for key in ("model", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(before[key][n], state[key][n]) for n in state[key])


def test_preconditioned_is_the_adam_preconditioned_gradient_alignment(state, reference, samples):
    """`preconditioned` = -lr * grad L_ref . (g_x / (sqrt(v_hat) + eps)), with x's clipped gradient
    and the stored second moment, computed here with plain autograd on one model per probe."""
    from curation.lm.batching import collate_sequences, token_losses

    got = probe_influence(state, reference, samples[:5], method="preconditioned", pad_id=0,
                          dtype=torch.float64)
    model = model_from_state(state, "cpu", torch.float64)
    params = dict(model.named_parameters())
    hp = state["hparams"]

    def flat_grad(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in params.items()}

    total, count = 0.0, 0
    for batch in reference:
        loss, n = token_losses(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        total, count = total + loss.sum(), count + int(n.sum())
    ref_grad = flat_grad(total / count)
    expected = []
    for sample in samples[:5]:
        b = collate_sequences([sample["tokens"]], 0)
        loss, n = token_losses(model(input_ids=b["input_ids"]).logits, b["labels"])
        g = flat_grad(loss.sum() / n.sum())
        norm = torch.sqrt(sum((x ** 2).sum() for x in g.values()))
        scale = min(1.0, hp["grad_clip_norm"] / (float(norm) + 1e-6)) if hp.get("grad_clip_norm") else 1.0
        score = 0.0
        for name, gx in g.items():
            v_hat = state["exp_avg_sq"][name].double() / (1 - hp["betas"][1] ** max(state["step"][name], 1.0))
            score += float((ref_grad[name] * (-hp["lr"]) * scale * gx / (v_hat.sqrt() + hp["eps"])).sum())
        expected.append(score)
    assert np.abs(expected).max() > 0
    assert rel_diff(got, np.array(expected)) < 1e-8
