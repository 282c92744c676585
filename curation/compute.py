"""The compute ledger's formulas: FLOPs of each phase of a stage from model shapes and counts.

One module so that every figure the ledger reports comes from the same arithmetic (README
"Compute ledger"). The transformer forward is PaLM's count (Chowdhery et al. 2022, appendix B:
both attention matmuls, QK^T and the weighted values) with the output projection counted (at the
bench's sizes the vocabulary matmul is most of the model):

    forward FLOPs per token  F = 2 N + 4 n_layer n_ctx d_model + 2 d_model V

where N is the parameters outside the embeddings, n_ctx the tokens attended to and V the
vocabulary. A backward pass costs twice a forward, so a training token costs 3F. The phases:

* training and evaluation tokens: 3F and F;
* `forward` probes: two forwards of each probe token (a central difference; a JVP costs about
  the same) plus one gradient (3F) of each reference token;
* per-sample-gradient probes (`first_order`, `preconditioned`, `exact`): 3F per probe token plus
  3F per reference token (exact's Hessian-vector products are not counted: a lower bound);
* a Group-MATES trajectory step: 3F of its batch's tokens plus F of the reference tokens it
  evaluates after the step;
* the influence model's encoder: 3E per token fitted (per epoch) and E per token scored, E its
  own forward per token (no output projection; a frozen backbone is fitted as a head only).

The counts come from the phases themselves; this module only multiplies.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """What the formula needs of a transformer: non-embedding parameters, layers, width, the
    tokens attended to, and the output vocabulary (0 for an encoder without an LM head)."""

    non_embedding_params: int
    n_layers: int
    d_model: int
    context: int
    vocab: int = 0

    def forward_per_token(self) -> float:
        return float(2 * self.non_embedding_params + 4 * self.n_layers * self.context * self.d_model
                     + 2 * self.d_model * self.vocab)


def shape_of(model, *, context: int) -> Shape:
    """The Shape of a transformers model: parameters outside the token and position embeddings."""
    config = model.config
    embeddings = {id(p) for m in model.modules() if type(m).__name__ == "Embedding" for p in m.parameters()}
    seen, non_embedding = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in embeddings:
            non_embedding += p.numel()
        seen.add(id(p))
    # an LM head tied to the token embedding is still a matmul per token: counted by `vocab`
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None and id(head.weight) not in embeddings:
        non_embedding -= head.weight.numel()
    d_model = getattr(config, "hidden_size", None) or config.n_embd
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    vocab = config.vocab_size if head is not None else 0
    return Shape(non_embedding, n_layers, d_model, context, vocab)


PROBE_COST = {  # (forwards per probe token, forwards per reference token)
    "forward": (2.0, 3.0),
    "first_order": (3.0, 3.0),
    "preconditioned": (3.0, 3.0),
    "exact": (3.0, 3.0),
}


def training_flops(lm: Shape, tokens: int) -> float:
    return 3.0 * lm.forward_per_token() * tokens


def eval_flops(lm: Shape, tokens: int) -> float:
    return lm.forward_per_token() * tokens


def probe_flops(lm: Shape, method: str, *, probe_tokens: int, reference_tokens: int) -> float:
    if method not in PROBE_COST:
        raise ValueError(f"no probe cost for method {method!r}; known: {sorted(PROBE_COST)}")
    per_probe, per_reference = PROBE_COST[method]
    return lm.forward_per_token() * (per_probe * probe_tokens + per_reference * reference_tokens)


def trajectory_flops(lm: Shape, *, steps: int, batch_tokens: int, reference_tokens: int) -> float:
    """`steps` trajectory steps in all (trajectories x length), each a training step on
    `batch_tokens` and a reference loss over `reference_tokens`."""
    return lm.forward_per_token() * steps * (3.0 * batch_tokens + reference_tokens)


def encoder_flops(encoder: Shape, *, fitted_tokens: int, scored_tokens: int) -> float:
    """`fitted_tokens` counts every epoch's tokens; a frozen backbone passes 0 and its embedding
    pass as `scored_tokens`."""
    return encoder.forward_per_token() * (3.0 * fitted_tokens + scored_tokens)
