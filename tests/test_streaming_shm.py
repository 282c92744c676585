"""Concurrent runs on one machine (`mates compare --jobs 2`) race for streaming's shared-memory
prefix: the loser's create fails with FileExistsError. A single-rank dataset searches again."""
from __future__ import annotations

import pytest


def test_a_lost_shared_memory_race_is_retried(monkeypatch, tmp_path):
    import numpy as np
    import streaming
    from streaming.base.stream import Stream

    from training import data

    calls = []

    class Racy:
        """Validates its streams as StreamingDataset does, and a lost race leaves them weighted
        (`apply_weights` ran before the shared memory was created), as the real one does."""

        def __init__(self, **kwargs):
            calls.append(kwargs)
            Stream.validate_weights(kwargs["streams"])
            if len(calls) < 3:
                Stream.apply_weights(kwargs["streams"], samples_per_stream=np.array([8]), choose_per_epoch=None,
                                     seed=0)
                raise FileExistsError(17, "File exists", "/000282_locals")

    monkeypatch.setattr(streaming, "StreamingDataset", Racy)
    monkeypatch.setattr(data.time, "sleep", lambda s: None)
    assert isinstance(data.streaming_dataset([(str(tmp_path), 1.0)], batch_size=4, shuffle=False, seed=0), Racy)
    assert len(calls) == 3

    calls.clear()
    monkeypatch.setattr(data, "SHM_ATTEMPTS", 2)   # a race lost every time is still an error
    with pytest.raises(FileExistsError):
        data.streaming_dataset([(str(tmp_path), None)], batch_size=4, shuffle=False, seed=0)
    calls.clear()
    monkeypatch.setattr(data.dist_utils, "world_size", lambda: 2)  # no retry on one rank of a multi-rank job
    with pytest.raises(FileExistsError):
        data.streaming_dataset([(str(tmp_path), None)], batch_size=4, shuffle=False, seed=0)
    assert len(calls) == 1
