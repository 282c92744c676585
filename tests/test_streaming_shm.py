"""Concurrent runs on one machine (`mates compare --jobs 2`) race for streaming's shared-memory
prefix: the loser's create fails with FileExistsError. A single-rank dataset searches again."""
from __future__ import annotations

import pytest


def test_a_lost_shared_memory_race_is_retried(monkeypatch, tmp_path):
    import streaming

    from training import data

    calls = []

    class Racy:
        def __init__(self, **kwargs):
            calls.append(kwargs)
            if len(calls) < 3:
                raise FileExistsError(17, "File exists", "/000282_locals")

    monkeypatch.setattr(streaming, "StreamingDataset", Racy)
    monkeypatch.setattr(data.time, "sleep", lambda s: None)
    assert isinstance(data.streaming_dataset([(str(tmp_path), None)], batch_size=4, shuffle=False, seed=0), Racy)
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
