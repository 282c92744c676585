"""Text views that the text-based baselines share: the stage's candidates and the target set."""
from __future__ import annotations

import numpy as np

from curation.data.sets import TARGETS, load_set
from curation.data.tokenizer import load_pool_tokenizer
from curation.methods.base import StageContext
from curation.store.pool import MDSFolder
from schemas.storage import join


def candidate_texts(ctx: StageContext, sample_ids=None) -> list[str]:
    """The decoded text of every candidate of the stage (or of `sample_ids`), in their order."""
    from curation.influence.scoring import pool_texts

    ids = ctx.candidates if sample_ids is None else sample_ids
    return pool_texts(MDSFolder(join(ctx.data_url, "pool")), ids, load_pool_tokenizer(ctx.data_url))


class TextCache:
    """The candidates' texts that rank 0 decoded to fit, kept for scoring any of them (its own slice
    of a launched run, or all of them in one process) without decoding them again."""

    def __init__(self):
        self.ids, self.texts = None, None

    def fitted_on(self, ctx: StageContext) -> list[str]:
        self.ids, self.texts = np.asarray(ctx.candidates), candidate_texts(ctx)
        return self.texts

    def of(self, ctx: StageContext, sample_ids) -> list[str]:
        if self.ids is not None and len(self.ids):
            at = np.minimum(np.searchsorted(self.ids, sample_ids), len(self.ids) - 1)  # candidates are sorted
            if np.array_equal(self.ids[at], sample_ids):
                return [self.texts[i] for i in at]
        return candidate_texts(ctx, sample_ids)


def target_texts(ctx: StageContext, limit: int | None) -> list[str]:
    """The decoded examples of the stage's target (the same rows MATES' oracle measures L_ref on)."""
    table = load_set(ctx.data_url, TARGETS, ctx.target)
    rows = table.column("input_ids").to_pylist()[:limit] if limit else table.column("input_ids").to_pylist()
    return load_pool_tokenizer(ctx.data_url).decode_batch(rows, skip_special_tokens=True)

