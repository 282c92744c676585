"""Every training step gets a full batch, and the LM trains without library warnings."""
import logging

import numpy as np
import pytest

from curation.lm.model import build_causal_lm
from schemas.errors import MatesError
from schemas.recipe import ModelConfig
from training.data import InMemorySamples, mds_loader


def _samples(n: int) -> list[dict]:
    return [{"tokens": np.arange(1, 6 + i % 3, dtype=np.uint16), "sample_id": i} for i in range(n)]


def test_loader_gives_full_batches_only():
    # 1,250 samples in batches of 16 is the demo's curated stage: 78 full batches, 2 samples left
    batches = list(mds_loader(InMemorySamples(_samples(1250)), batch_size=16, pad_id=0))
    assert len(batches) == 78
    assert {int(b["input_ids"].shape[0]) for b in batches} == {16}
    ids = np.concatenate([b["sample_id"].numpy() for b in batches])
    assert np.array_equal(ids, np.arange(1248))


def test_loader_refuses_fewer_samples_than_one_batch():
    with pytest.raises(MatesError, match="fewer than one batch"):
        mds_loader(InMemorySamples(_samples(3)), batch_size=4, pad_id=0)


def test_causal_lm_loss_logs_no_warning():
    import torch

    logging.Logger.warning_once.cache_clear()  # transformers warns once per process otherwise
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        for name in ("gpt2", "gpt_neox"):
            lm = build_causal_lm(ModelConfig(name=name, d_model=16, n_layers=1, n_heads=2, max_seq_len=16),
                                 vocab_size=64, eos_id=0, seed=0)
            ids = torch.arange(1, 9).view(1, 8)
            loss = lm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            assert torch.isfinite(loss) and float(loss) > 0
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
