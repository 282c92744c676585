"""The model family: SDPA (training, evaluation) equals eager attention (the oracle), and Llama
works wherever GPT-2 does: probe state round trip, the batched oracle against the plain loop."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from curation.lm.batching import collate_sequences, token_losses
from curation.lm.model import build_causal_lm, set_attention
from curation.oracle.probes import model_from_state, probe_influence, slow_reference_influence
from jobs.bench_probe import toy_probe_state
from schemas.recipe import ModelConfig
from tests.oracle_fixtures import VOCAB, one_thread, ragged_reference, rel_diff, samples  # noqa: F401

LLAMA = ModelConfig(name="llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def padded_batch() -> dict:
    rng = np.random.default_rng(3)
    return collate_sequences([rng.integers(1, VOCAB, k).tolist() for k in (32, 20, 7)], pad_id=0)


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "llama"])
def test_sdpa_losses_equal_eager_in_fp32(name):
    """Per-token losses and gradients of a right-padded batch: SDPA = eager to 1e-5 (fp32, CPU)."""
    cfg = dataclasses.replace(LLAMA, name=name, n_kv_heads=2 if name == "llama" else None)
    batch = padded_batch()
    out = {}
    for impl in ("eager", "sdpa"):
        model = build_causal_lm(dataclasses.replace(cfg, attn_implementation=impl), VOCAB, 0, seed=5)
        assert model.config._attn_implementation == impl
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = token_losses(logits[:, :-1], batch["labels"][:, 1:])
        (loss.sum() / n.sum()).backward()
        out[impl] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(out["sdpa"][0], out["eager"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=1e-4, atol=1e-5)


def test_llama_is_the_architecture_the_recipe_names():
    model = build_causal_lm(LLAMA, VOCAB, 0, seed=0)
    c = model.config
    assert (type(model).__name__, c.num_key_value_heads, c.intermediate_size, c.rope_theta) == \
        ("LlamaForCausalLM", 2, 88, 10000.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as small Llamas are
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


@pytest.fixture(scope="module")
def llama_state() -> dict:
    return toy_probe_state(LLAMA, VOCAB)


def test_llama_probe_state_rebuilds_the_same_model_with_eager_attention(llama_state):
    assert llama_state["model_type"] == "llama"
    model = model_from_state(llama_state, "cpu")
    assert model.config._attn_implementation == "eager"
    fresh = build_causal_lm(LLAMA, VOCAB, 0, seed=0)
    fresh.load_state_dict(llama_state["model"])
    set_attention(fresh, "eager")
    batch = padded_batch()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = fresh.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method, tol", [("exact", 1e-3), ("first_order", 0.2)])
def test_llama_oracle_matches_the_plain_loop(llama_state, samples, method, tol):  # noqa: F811
    """The vmapped oracle on Llama (grouped-query heads, rotary, RMSNorm) against deepcopy + AdamW
    per probe: exact to 1e-3 relative, first order within its approximation."""
    reference = ragged_reference(10)
    slow = slow_reference_influence(llama_state, reference, samples[:6], pad_id=0)
    fast = probe_influence(llama_state, reference, samples[:6], method=method, probe_batch=3, pad_id=0)
    assert rel_diff(fast, slow) < tol, (fast, slow)


def test_llama_group_trajectories_and_preconditioned_probes_run(llama_state, samples):  # noqa: F811
    """Group-MATES' batched trajectories and the preconditioned oracle transform Llama too: one-step
    trajectories are the exact oracle, and every influence is finite."""
    from curation.oracle.trajectories import run_trajectories

    reference = ragged_reference(6)
    few = samples[:4]
    one = run_trajectories(llama_state, reference, [[s] for s in few], pad_id=0, batch=2, dtype=torch.float64)
    exact = probe_influence(llama_state, reference, few, method="exact", pad_id=0, dtype=torch.float64)
    np.testing.assert_allclose(one[:, 0], exact, rtol=1e-9, atol=1e-15)
    two = run_trajectories(llama_state, reference, [few[:2], few[2:]], pad_id=0, batch=2)
    pre = probe_influence(llama_state, reference, few, method="preconditioned", pad_id=0)
    assert two.shape == (2, 2) and np.isfinite(two).all() and np.isfinite(pre).all()
