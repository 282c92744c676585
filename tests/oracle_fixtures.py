"""Shared pieces of the oracle tests (test_probing, test_group_oracle): a micro GPT-2 probe state,
a ragged LAMBADA-style reference set, pool-like samples, one torch thread."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from curation.lm.batching import ReferenceSet
from jobs.bench_probe import toy_probe_state, toy_samples
from schemas import tables
from schemas.recipe import ModelConfig

VOCAB = 300
MICRO = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro tensors gain nothing from intra-op threads, and on a shared 2-core box OpenMP spinning
    made these modules 20-40x slower; restored afterwards for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def state() -> dict:
    return toy_probe_state(MICRO, VOCAB)


def ragged_reference(n: int) -> ReferenceSet:
    """Ragged lengths (padding inside reference batches) and LAMBADA-style target starts."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(12, 33, n)
    table = pa.table({"input_ids": [rng.integers(1, VOCAB, k).tolist() for k in lengths],
                      "target_start": [int(k) - int(rng.integers(1, 6)) for k in lengths]})
    return ReferenceSet(tables.conform(table, tables.REFERENCE), pad_id=0, batch_size=5)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return toy_samples(12, VOCAB, min_len=6, max_len=32)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())
