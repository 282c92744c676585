"""The compute ledger's formulas against torch's own FLOP counter on a real model."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from curation import compute


def _gpt2(d=64, layers=3, vocab=500, ctx=48):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=layers, n_head=4))
    model.config._attn_implementation = "eager"
    return model.eval()


def test_shape_counts_parameters_outside_the_embeddings():
    d, layers = 64, 3
    shape = compute.shape_of(_gpt2(d, layers), context=48)
    # a GPT-2 block: qkv 3d^2+3d, proj d^2+d, mlp 8d^2+5d, two LayerNorms 4d; the final LayerNorm 2d
    assert shape.non_embedding_params == layers * (12 * d * d + 13 * d) + 2 * d
    assert (shape.n_layers, shape.d_model, shape.vocab) == (layers, d, 500)


@pytest.mark.parametrize("ctx", [16, 48])
def test_forward_formula_matches_torchs_flop_counter(ctx):
    model = _gpt2(ctx=48)
    tokens = torch.randint(0, 500, (2, ctx))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    measured = counter.get_total_flops() / tokens.numel()
    # torch counts matmuls only; the formula's 2N also counts each bias and LayerNorm weight
    # (2 FLOPs per token each). The attention term is the full context, as the causal forward
    # multiplies the whole QK^T. Off by one layer, one head or one context token, this fails.
    vector_params = sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 1) \
        + sum(p.numel() for p in model.transformer.ln_f.parameters())
    formula = compute.shape_of(model, context=ctx).forward_per_token()
    assert measured + 2 * vector_params == formula


def test_training_costs_three_forwards_and_backward_counted():
    model = _gpt2()
    tokens = torch.randint(0, 500, (2, 48))
    with FlopCounterMode(display=False) as counter:
        model(tokens, labels=tokens).loss.backward()
    measured = counter.get_total_flops()
    shape = compute.shape_of(model, context=48)
    # backward of the first layer's input gradient is skipped by autograd (no grad for token ids),
    # so the measured figure is a little under 3F
    assert 0.9 < measured / compute.training_flops(shape, tokens.numel()) <= 1.0


def test_phase_formulas():
    lm = compute.Shape(non_embedding_params=10, n_layers=1, d_model=2, context=3, vocab=5)
    f = lm.forward_per_token()
    assert f == 2 * 10 + 4 * 1 * 3 * 2 + 2 * 2 * 5
    assert compute.probe_flops(lm, "forward", probe_tokens=7, reference_tokens=11) == f * (2 * 7 + 3 * 11)
    assert compute.probe_flops(lm, "first_order", probe_tokens=7, reference_tokens=11) == f * (3 * 7 + 3 * 11)
    assert compute.trajectory_flops(lm, steps=4, batch_tokens=6, reference_tokens=9) == f * 4 * (18 + 9)
    enc = compute.Shape(non_embedding_params=10, n_layers=1, d_model=2, context=3)
    assert compute.encoder_flops(enc, fitted_tokens=5, scored_tokens=8) == enc.forward_per_token() * (15 + 8)
    with pytest.raises(ValueError, match="known"):
        compute.probe_flops(lm, "bogus", probe_tokens=1, reference_tokens=1)


def test_meta_shape_of_a_probe_state_equals_the_built_model():
    """The methods read the LM's shape from a probe state's config on the meta device (no weights)."""
    from curation.methods.ledger import lm_shape

    model = _gpt2()
    state = {"model_type": "gpt2", "model_config": model.config.to_dict()}
    assert lm_shape(state) == compute.shape_of(model, context=48)


def test_data_parallel_scoring_counts_every_ranks_share(tmp_path):
    """Rank 0's marker adds the other ranks' scoring FLOPs and token counts (not per-token figures)."""
    import numpy as np

    from curation.methods.base import CurationMethod, StageContext
    from curation.stage_job import _parallel_predictions

    class Scorer(CurationMethod):
        def prepare(self, ctx):
            pass

        def score_slice(self, ctx, ids):
            ctx.flops["score"] = ctx.flops.get("score", 0.0) + 10.0 * len(ids)
            ctx.metrics["curation/ledger/score_encoder_read_tokens"] = 2 * len(ids)
            ctx.metrics["curation/ledger/encoder_forward_flops_per_token"] = 5.0
            return np.zeros(len(ids))

    def ctx():
        return StageContext(run_url=str(tmp_path), data_url=str(tmp_path), stage=1, candidates=np.arange(10),
                            n_select=1, seed=0, options=None)

    from curation.stage_job import PREPARED
    from curation.store.stage_index import stage_url
    from schemas.storage import store_for

    store_for(stage_url(str(tmp_path), 1)).write_bytes(b"{}", PREPARED)  # rank 1 polls for it
    assert _parallel_predictions(ctx(), Scorer(), 1, 2) is None  # rank 1 first, then rank 0
    rank0 = ctx()
    assert len(_parallel_predictions(rank0, Scorer(), 0, 2)) == 10
    assert rank0.flops == {"score": 100.0}
    assert rank0.metrics["curation/ledger/score_encoder_read_tokens"] == 20
    assert rank0.metrics["curation/ledger/encoder_forward_flops_per_token"] == 5.0


def test_perplexity_ledger_is_one_lm_forward_of_every_candidate(local_pool, tmp_path):
    import numpy as np

    from curation.methods.base import StageContext
    from curation.methods.ledger import lm_shape, sample_tokens
    from curation.methods.perplexity_method import PerplexityMethod
    from curation.store.pool import MDSFolder
    from jobs.bench_probe import toy_probe_state
    from schemas.method_options import PerplexityOptions
    from schemas.probe_state import save_probe_state
    from schemas.recipe import load_recipe
    from tests.conftest import MICRO_RECIPE

    recipe = load_recipe(MICRO_RECIPE)
    state = toy_probe_state(recipe.model, recipe.tokenizer.vocab_size)
    save_probe_state(state, str(tmp_path), "state.pt")
    ctx = StageContext(run_url=str(tmp_path / "run"), data_url=local_pool, stage=1, candidates=np.arange(40),
                       n_select=10, seed=0, options=PerplexityOptions(), state_url=str(tmp_path / "state.pt"),
                       log=lambda m: None)
    PerplexityMethod().predict(ctx)
    tokens = sample_tokens(MDSFolder(f"{local_pool}/pool"), np.arange(40))
    assert ctx.metrics["curation/ledger/scored_tokens"] == tokens > 0
    assert ctx.flops == {"score": compute.eval_flops(lm_shape(state), tokens)}


def test_projection_uses_pythias_published_shapes_and_the_ledgers_arithmetic(tmp_path):
    """`mates bench projection`: Pythia's non-embedding parameters as the Pythia paper lists them
    (table 1: 302,311,424 and 805,736,448), and one row redone by hand from the formulas."""
    from jobs import bench_projection as bp

    assert bp.lm_shape("pythia-410m", 1024).non_embedding_params == 302_311_424
    assert bp.lm_shape("pythia-1b", 1024).non_embedding_params == 805_736_448
    result = bp.bench_projection(out=str(tmp_path / "p.json"), log=lambda m: None)
    assert (tmp_path / "p.json").exists() and len(result["rows"]) == 24
    setup = bp.Setup()
    row = next(r for r in result["rows"] if r["lm"] == "pythia-1b" and r["pool"] == "paper"
               and r["encoder"] == "minilm-l6" and r["backbone"] == "finetune" and r["probe_method"] == "forward")
    f = bp.lm_shape("pythia-1b", 1024).forward_per_token()
    e = bp.encoder_shape("minilm-l6", 512).forward_per_token()
    train = 3 * f * 10_000 * 512 * 1024
    assert row["train_flops"] == train
    assert row["flops_probe"] == f * (2 * 80_000 * 1024 + 3 * 1024 * 1024)
    assert row["flops_score"] == e * 25_600_000 * 512
    fitted = int(0.9 * 80_000 * 512) * 3
    assert row["flops_fit"] == e * (3 * fitted + (80_000 * 512 * 3 - fitted))
    assert row["curation_share"] == pytest.approx((row["flops_probe"] + row["flops_fit"] + row["flops_score"]) / train)
    assert setup.stage_samples / setup.selection_ratio == row["candidates"]
