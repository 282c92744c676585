"""Evaluation at every stage boundary: every eval set of the pool, each with its own loss kind.

* `lm`: mean loss over every token of held-out text; perplexity = exp(loss);
* `cloze`: LAMBADA style; the loss counts the target word's tokens only.

Eval sets live under `<data>/eval/` (curation/data/sets.py); no curation code reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curation.lm.batching import ReferenceSet, mean_token_loss
from curation.data.sets import EVAL, load_set, pool_sets


@dataclass
class EvalSet:
    name: str
    kind: str            # lm | cloze
    examples: ReferenceSet


def load_eval_sets(data_url: str, marker: dict, *, pad_id: int, batch_size: int, max_examples: int,
                   device="cpu") -> list[EvalSet]:
    """Every eval set of the pool (in ingest order), its first `max_examples` rows."""
    return [EvalSet(name, entry["kind"],
                    ReferenceSet(load_set(data_url, EVAL, name), pad_id, batch_size, max_examples).to(device))
            for name, entry in pool_sets(marker, EVAL).items()]


@torch.no_grad()
def evaluate(model: torch.nn.Module, sets: list[EvalSet]) -> list[dict]:
    """One row per eval set: {eval_set, loss_kind, loss, perplexity}."""
    rows = []
    for s in sets:
        loss = mean_token_loss(model, s.examples)
        rows.append({"eval_set": s.name, "loss_kind": s.kind, "loss": loss,
                     "perplexity": math.exp(min(loss, 50.0))})
    return rows
