"""Pool-scale scoring with the influence model (DESIGN.md 2.3, first half): one prediction per candidate.

The pool stores token ids of the LM's own BPE, and the influence model reads MiniLM word pieces,
so each batch goes: MDS sample -> pool ids -> text (pool tokenizer) -> MiniLM ids (truncated to
`max_len`) -> forward. Scoring is data-parallel over ranks: each rank scores the contiguous slice
`shard_for_rank` gives it and the caller writes `scores/part-<rank>.parquet` (DESIGN.md 5).
"""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
import torch

from curation.influence.finetuned import InfluenceModel
from curation.store.pool import MDSFolder
from schemas.errors import MatesError


def shard_for_rank(sample_ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous slice of `sample_ids` that `rank` scores; slices differ in size by at most 1."""
    if int(world_size) < 1:
        raise MatesError(f"`world_size` must be >= 1; got {world_size}.")
    if not 0 <= int(rank) < int(world_size):
        raise MatesError(f"`rank` must be in 0..{int(world_size) - 1}; got {rank}.")
    return np.array_split(np.asarray(sample_ids), int(world_size))[int(rank)]


def open_pool(pool) -> MDSFolder:
    return pool if isinstance(pool, MDSFolder) else MDSFolder(str(pool))


def pool_texts(pool: MDSFolder, sample_ids: np.ndarray, pool_tokenizer) -> list[str]:
    """The samples' text, decoded from the pool's ids (special tokens such as EOS dropped)."""
    tokens = []
    for sample_id in sample_ids:
        sample = pool[int(sample_id)]
        if int(sample["sample_id"]) != int(sample_id):
            raise MatesError(f"`{pool.url}` holds sample_id {int(sample['sample_id'])} at position "
                             f"{int(sample_id)}; the pool's ids must be 0..N-1 in shard order (re-ingest it).")
        tokens.append(np.asarray(sample["tokens"]).tolist())
    return pool_tokenizer.decode_batch(tokens, skip_special_tokens=True)


def encoder_batches(model: InfluenceModel, pool: MDSFolder, sample_ids: np.ndarray, pool_tokenizer,
             batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """MiniLM batches {"input_ids": [B, L], "attention_mask": [B, L]} in the order of `sample_ids`."""
    for start in range(0, len(sample_ids), batch_size):
        yield model.tokenize(pool_texts(pool, sample_ids[start:start + batch_size], pool_tokenizer))


def _progress_bar(total: int, progress: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc="score", unit="sample", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise MatesError(f"`batch_size` must be >= 1; got {batch_size}.")
    return int(batch_size)


def score_samples(model: InfluenceModel, pool, sample_ids: np.ndarray, pool_tokenizer, *,
                  batch_size: int = 64, device="cpu", with_embeddings: bool = False,
                  progress: bool | None = None, counts: dict | None = None):
    """Predicted influence [N] float32 of each sample id, in order (and embeddings [N, H] if asked).

    `pool` is the pool's MDS folder URL (`<data>/pool`) or an open `MDSFolder`. `progress`: None
    shows a tqdm bar on stderr only when it is a terminal; True / False force it on / off.
    The model is moved to `device` and left in the train/eval mode it came in. `counts`, if given,
    gets the encoder tokens read added to its "tokens" (the compute ledger).
    """
    pool = open_pool(pool)
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    batch_size = check_batch_size(batch_size)
    was_training = model.training
    model.to(device).eval()
    preds, embeds = [], []
    bar = _progress_bar(len(sample_ids), progress)
    try:
        with torch.inference_mode():
            for batch in encoder_batches(model, pool, sample_ids, pool_tokenizer, batch_size):
                if counts is not None:
                    counts["tokens"] = counts.get("tokens", 0) + int(batch["attention_mask"].sum())
                batch = {k: v.to(device) for k, v in batch.items()}
                if with_embeddings:
                    pred, emb = model.predict_and_embed(**batch)          # [B], [B, H]
                    embeds.append(emb.float().cpu())
                else:
                    pred = model(**batch)                                 # [B]
                preds.append(pred.float().cpu())
                bar.update(len(pred))
    finally:
        bar.close()
        model.train(was_training)
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.float32)            # [N]
    if not with_embeddings:
        return pred
    emb = torch.cat(embeds).numpy() if embeds else np.zeros((0, model.hidden_size), np.float32)  # [N, H]
    return pred, emb
