"""`mates bench score`'s measurement: what the text round trip of pool scoring costs next to the
encoder alone (curation/influence/scoring.py is the scoring itself)."""
from __future__ import annotations

import time

import numpy as np
import torch

from curation.influence.finetuned import InfluenceModel
from curation.influence.scoring import check_batch_size, encoder_batches, open_pool
from schemas.errors import MatesError


def bench_score(model: InfluenceModel, pool, sample_ids: np.ndarray, pool_tokenizer, *,
                batch_size: int = 64, device="cpu") -> dict:
    """Samples/s of the full scoring path next to the bare forward on the same in-memory batches.

    Full path: read from MDS, detokenize, MiniLM-tokenize, forward. Bare: the forward alone on the
    batches the full pass built. `ratio` = full / bare: how much of the encoder's speed reaches the
    pool (1.0 = the text round trip is free). `prep_seconds` is the full pass's time outside the
    forward, which stays readable when other load on the machine makes the two passes' speeds
    drift. One batch is run first to warm up kernels.
    """
    pool = open_pool(pool)
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    batch_size = check_batch_size(batch_size)
    if len(sample_ids) == 0:
        raise MatesError("`sample_ids` is empty; give at least one sample to benchmark.")
    was_training = model.training
    model.to(device).eval()
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    try:
        with torch.inference_mode():
            warm = next(encoder_batches(model, pool, sample_ids[:batch_size], pool_tokenizer, batch_size))
            model(**{k: v.to(device) for k, v in warm.items()})
            sync()

            kept, prep_s = [], 0.0
            started = mark = time.perf_counter()
            for batch in encoder_batches(model, pool, sample_ids, pool_tokenizer, batch_size):
                prep_s += time.perf_counter() - mark  # read + detokenize + tokenize of this batch
                kept.append(batch)
                model(**{k: v.to(device) for k, v in batch.items()})
                sync()
                mark = time.perf_counter()
            full_s = time.perf_counter() - started

            on_device = [{k: v.to(device) for k, v in b.items()} for b in kept]
            sync()
            started = time.perf_counter()
            for batch in on_device:
                model(**batch)
            sync()
            bare_s = time.perf_counter() - started
    finally:
        model.train(was_training)
    n = len(sample_ids)
    tokens = sum(int(b["attention_mask"].sum()) for b in kept)
    return {"samples": n, "batch_size": batch_size, "layers_kept": model.layers_kept,
            "max_len": model.max_len, "mean_encoder_tokens": tokens / n,
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "pipeline_seconds": full_s, "prep_seconds": prep_s, "encoder_seconds": bare_s,
            "pipeline_samples_per_s": n / full_s, "encoder_samples_per_s": n / bare_s,
            "ratio": bare_s / full_s}
