"""`probe_method: forward` (curation/oracle/forward.py): the preconditioned first-order influence
by a directional derivative of each candidate's own loss, no per-sample gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from curation.oracle import forward as fwd
from curation.oracle.probes import probe_influence
from schemas.errors import MatesError

from tests.oracle_fixtures import MICRO, VOCAB, one_thread, ragged_reference, rel_diff, samples, state  # noqa: F401


@pytest.fixture(scope="module")
def reference():
    return ragged_reference(12)


@pytest.fixture(scope="module")
def unclipped(state) -> dict:
    return {**state, "hparams": {**state["hparams"], "grad_clip_norm": 0.0}}


@pytest.fixture(scope="module")
def preconditioned64(unclipped, reference, samples) -> np.ndarray:
    return probe_influence(unclipped, reference, samples, method="preconditioned", probe_batch=6,
                           pad_id=0, dtype=torch.float64)


def test_forward_jvp_equals_preconditioned_without_clipping_float64(unclipped, reference, samples,
                                                                    preconditioned64):
    """fp64 jvp = -lr <g_x / (sqrt(v_hat) + eps), grad L_ref>, to 1e-4 relative (measured 2e-16);
    reference micro-batches of 2 rows (not the set's 5) must not change it."""
    got = probe_influence(unclipped, reference, samples, method="forward", probe_batch=5, pad_id=0,
                          dtype=torch.float64, reference_batch=2, derivative="jvp")
    assert np.abs(preconditioned64).std() > 0 and len(set(np.sign(preconditioned64))) == 2
    assert rel_diff(got, preconditioned64) < 1e-4
    # the check has teeth: a flipped sign, or the raw reference gradient as the direction (no
    # preconditioner), is far outside the tolerance
    assert rel_diff(-got, preconditioned64) > 1.0
    state_sgd = {**unclipped, "exp_avg_sq": {n: torch.full_like(v, 1.0) for n, v in unclipped["exp_avg_sq"].items()}}
    wrong_direction = probe_influence(state_sgd, reference, samples, method="forward", probe_batch=5,
                                      pad_id=0, dtype=torch.float64, derivative="jvp")
    assert rel_diff(wrong_direction, preconditioned64) > 0.5


def test_forward_central_difference_float32_agrees(unclipped, reference, samples, preconditioned64):
    """`auto` in fp32 = central difference with the eps^(1/3) step rule: close to the fp64 truth."""
    prober = fwd.ForwardProber(unclipped, reference, derivative="auto", dtype=torch.float32)
    assert prober.derivative == "central"
    # the rule: h ||u|| = eps^(1/3) ||theta||, with u and theta as the jvp prober keeps them
    plain = fwd.ForwardProber(unclipped, reference, derivative="jvp", dtype=torch.float32)
    norm = lambda d: float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))  # noqa: E731
    rule = torch.finfo(torch.float32).eps ** (1 / 3) * norm(plain.params) / norm(plain.u)
    assert abs(prober.step_size / rule - 1) < 1e-6
    got = probe_influence(unclipped, reference, samples, method="forward", probe_batch=4, pad_id=0)
    assert rel_diff(got, preconditioned64) < 0.02  # measured 4.6e-3 (roundoff of eps^(2/3))
    assert spearmanr(got, preconditioned64)[0] > 0.95


def test_forward_with_clipping_on_ranks_like_clipped_preconditioned(state, reference, samples):
    """The clip factor is what forward cannot see: with it on, agreement is by rank, not value."""
    clipped = probe_influence(state, reference, samples, method="preconditioned", pad_id=0,
                              dtype=torch.float64)
    got = probe_influence(state, reference, samples, method="forward", pad_id=0, dtype=torch.float64)
    assert spearmanr(got, clipped)[0] > 0.7


def test_forward_errors_name_the_key(state, reference, samples):
    with pytest.raises(MatesError, match="`forward_derivative` must be one of"):
        probe_influence(state, reference, samples, method="forward", pad_id=0, derivative="fd")
    with pytest.raises(MatesError, match="`reference_batch` and `probe_batch` must be >= 1"):
        probe_influence(state, reference, samples, method="forward", pad_id=0, reference_batch=0)
    long = [{"tokens": np.ones(MICRO.max_seq_len + 1, np.uint16), "sample_id": 0}]
    with pytest.raises(MatesError, match="at most the model's"):
        probe_influence(state, reference, long, method="forward", pad_id=0)
    assert probe_influence(state, reference, [], method="forward", pad_id=0).shape == (0,)


@pytest.mark.parametrize("name, kv_heads", [("gpt_neox", None), ("llama", 1)])
def test_forward_on_other_architectures_equals_preconditioned(reference, samples, name, kv_heads):
    """The chunked loss reads any transformers causal LM (base_model + output embeddings): GPT-NeoX
    (untied head, rotary positions: measured 3e-9, its rotary tables are fp32) and Llama (RMSNorm,
    SwiGLU, grouped-query heads)."""
    from jobs.bench_probe import toy_probe_state
    from schemas.recipe import ModelConfig

    neox = toy_probe_state(ModelConfig(name=name, d_model=32, n_layers=2, n_heads=2, n_kv_heads=kv_heads,
                                       max_seq_len=32), VOCAB)
    neox = {**neox, "hparams": {**neox["hparams"], "grad_clip_norm": 0.0}}
    want = probe_influence(neox, reference, samples[:6], method="preconditioned", pad_id=0, dtype=torch.float64)
    got = probe_influence(neox, reference, samples[:6], method="forward", pad_id=0, dtype=torch.float64)
    assert np.abs(want).max() > 0 and rel_diff(got, want) < 1e-4
