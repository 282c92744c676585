"""Text views that the text-based baselines share: the stage's candidates and the target set."""
from __future__ import annotations

from curation.data.sets import TARGETS, load_set
from curation.data.tokenizer import load_pool_tokenizer
from curation.methods.base import StageContext
from curation.store.pool import MDSFolder
from schemas.storage import join


def candidate_texts(ctx: StageContext) -> list[str]:
    """The decoded text of every candidate of the stage, in `ctx.candidates` order."""
    from curation.influence.scoring import pool_texts

    return pool_texts(MDSFolder(join(ctx.data_url, "pool")), ctx.candidates, load_pool_tokenizer(ctx.data_url))


def target_texts(ctx: StageContext, limit: int | None) -> list[str]:
    """The decoded examples of the stage's target (the same rows MATES' oracle measures L_ref on)."""
    table = load_set(ctx.data_url, TARGETS, ctx.target)
    rows = table.column("input_ids").to_pylist()[:limit] if limit else table.column("input_ids").to_pylist()
    return load_pool_tokenizer(ctx.data_url).decode_batch(rows, skip_special_tokens=True)

