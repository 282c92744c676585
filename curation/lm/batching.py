"""Batches of token sequences for causal-LM losses, shared by training, evaluation and probing.

A batch is {"input_ids": [B, L] long, "attention_mask": [B, L] long, "labels": [B, L] long}:
right-padded with the pad id, and `labels` = -100 wherever the loss must not count (padding, and
in a reference batch every position before the example's target).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

IGNORE = -100


def collate_sequences(seqs: Sequence[Sequence[int]], pad_id: int, target_starts: Sequence[int] | None = None,
                      length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `seqs` to `length` (default: the longest) and build the loss labels."""
    length = length or max(len(s) for s in seqs)
    batch = len(seqs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)   # [B, L]
    attention_mask = torch.zeros((batch, length), dtype=torch.long)      # [B, L]
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)       # [B, L]
    for i, seq in enumerate(seqs):
        ids = torch.as_tensor(np.asarray(seq[:length], dtype=np.int64))
        n = ids.numel()
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        start = target_starts[i] if target_starts is not None else 0
        labels[i, start:n] = ids[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_samples(samples: list[dict], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """MDS pool samples ({"tokens": uint16 array, "sample_id": int}) -> an LM batch."""
    batch = collate_sequences([s["tokens"] for s in samples], pad_id, length=length)
    batch["sample_id"] = torch.as_tensor([int(s["sample_id"]) for s in samples], dtype=torch.long)
    return batch


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token loss and counted tokens: ([B], [B])."""
    # at least fp32 (bf16 logits lose the loss), but keep float64 when the caller uses it
    shift_logits = logits[:, :-1, :].to(torch.promote_types(logits.dtype, torch.float32))  # [B, L-1, V]
    shift_labels = labels[:, 1:]                               # [B, L-1]
    loss = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                             ignore_index=IGNORE, reduction="none")  # [B, L-1]
    counted = (shift_labels != IGNORE)
    return loss.sum(dim=1), counted.sum(dim=1)


class ReferenceSet:
    """A tokenized reference set (REFERENCE table rows) cut into fixed batches."""

    def __init__(self, table, pad_id: int, batch_size: int, limit: int | None = None):
        rows = table.to_pylist()[:limit] if limit else table.to_pylist()
        self.batches = [collate_sequences([r["input_ids"] for r in rows[i:i + batch_size]], pad_id,
                                          [r["target_start"] for r in rows[i:i + batch_size]])
                        for i in range(0, len(rows), batch_size)]
        self.size = len(rows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def to(self, device) -> "ReferenceSet":
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in self.batches]
        return self


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, reference: ReferenceSet) -> float:
    """Mean loss per counted token over the whole reference set (L_ref of DESIGN.md 2.1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in reference:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = token_losses(logits, batch["labels"])
        total += float(loss.sum())
        count += int(n.sum())
    model.train(was_training)
    return total / max(count, 1)
