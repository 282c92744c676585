"""The compute ledger's bookkeeping for the methods: model shapes and counts -> `ctx.flops`.

The arithmetic is curation/compute.py's; here the shapes are read from what a stage has (the probe
state, the MiniLM encoder) and each phase's FLOPs are added to `ctx.flops[<phase>]` (written to
`_SUCCESS` as `flops_<phase>`, next to `seconds_<phase>`) with the counts they came from in
`ctx.metrics` as `curation/ledger/<count>`, so a reader can redo the sum.
"""
from __future__ import annotations

import numpy as np

from curation.compute import Shape, shape_of
from curation.data.sets import TARGETS, load_set
from curation.methods.base import StageContext


def lm_shape(state: dict) -> Shape:
    """The LM of a probe state, built on the meta device (no weights), attending to its context."""
    import torch

    from curation.lm.model import ARCHITECTURES

    config_cls, model_cls = ARCHITECTURES[state["model_type"]]
    config = config_cls.from_dict(dict(state["model_config"]))
    with torch.device("meta"):
        model = model_cls(config)
    return shape_of(model, context=config.max_position_embeddings)  # = model.max_seq_len


def encoder_shape(influence_model) -> Shape:
    """The MiniLM encoder of an `InfluenceModel` (no LM head: vocab 0) at its `max_len`."""
    return shape_of(influence_model.encoder, context=influence_model.max_len)


def reference_tokens(ctx: StageContext, limit: int | None = None) -> int:
    """Tokens of the target rows one reference pass reads (`MatesMethod.oracle_inputs`' rows)."""
    rows = min(ctx.options.max_target, limit or ctx.options.max_target)
    column = load_set(ctx.data_url, TARGETS, ctx.target).column("input_ids").to_pylist()[:rows]
    return int(sum(len(r) for r in column))


def sample_tokens(pool, ids) -> int:
    """Tokens of pool samples `ids` (a sample id may repeat: counted each time)."""
    return int(sum(len(pool[int(i)]["tokens"]) for i in np.asarray(ids).ravel()))


def record(ctx: StageContext, phase: str, flops: float, **counts) -> None:
    """Add `flops` to the phase and `counts` to `curation/ledger/<name>` (both accumulate)."""
    ctx.flops[phase] = ctx.flops.get(phase, 0.0) + float(flops)
    for name, value in counts.items():
        key = f"curation/ledger/{name}"
        ctx.metrics[key] = ctx.metrics.get(key, 0) + value
