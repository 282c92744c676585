"""Evaluation at every stage boundary: cloze reference loss and held-out perplexity.

* cloze: LAMBADA-style; the loss counts the target word's tokens only (the oracle's L_ref);
* held-out: mean token loss over English summaries held out of the pool; perplexity = exp(loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curation.batching import ReferenceSet, mean_token_loss
from schemas.errors import MatesError
from schemas.storage import read_parquet, store_for


@dataclass
class ReferenceSets:
    cloze: ReferenceSet
    heldout: ReferenceSet


def load_reference_sets(data_url: str, *, pad_id: int, batch_size: int, max_cloze: int,
                        max_heldout: int, device="cpu") -> ReferenceSets:
    store = store_for(data_url)
    for name in ("cloze", "heldout"):
        if not store.exists("reference", f"{name}.parquet"):
            raise MatesError(f"`data` {data_url!r} has no reference/{name}.parquet; ingest with "
                             f"--reference FOLDER holding cloze.jsonl and heldout.jsonl.")
    cloze = ReferenceSet(read_parquet(data_url, "reference", "cloze.parquet"), pad_id, batch_size, max_cloze)
    heldout = ReferenceSet(read_parquet(data_url, "reference", "heldout.parquet"), pad_id, batch_size, max_heldout)
    return ReferenceSets(cloze.to(device), heldout.to(device))


@torch.no_grad()
def evaluate(model: torch.nn.Module, refs: ReferenceSets) -> dict:
    heldout = mean_token_loss(model, refs.heldout)
    return {"cloze_loss": mean_token_loss(model, refs.cloze), "heldout_loss": heldout,
            "heldout_perplexity": math.exp(min(heldout, 50.0))}
