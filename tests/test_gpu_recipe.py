"""training/recipes/gpu.yaml, with CPU-sized overrides, runs end to end: so every key of the GPU
recipe but the CUDA-only ones (FSDP, micro-batch `auto`, bf16) is exercised on every CI run."""
from __future__ import annotations

import re

import pytest

from schemas.storage import read_parquet
from tests.conftest import mates

pytestmark = pytest.mark.slow

# What a CPU can run in seconds; every other key is the recipe's own.
CPU_SIZED = {"device": "cpu", "ingest.seq_len": 64, "ingest.min_tokens": 8, "model.max_seq_len": 64,
             "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 64,
             "train_loader.batch_size": 8, "train_loader.microbatch_size": 4, "parallelism": "{}",
             "stages.count": 2, "stages.batches": "[3, 2]", "stages.pool_per_stage": 400, "stages.method": "random",
             "eval.max_examples": 16, "callbacks.speed_monitor.window_size": 1}


def test_gpu_recipe_runs_a_few_steps_on_the_cpu(local_pool, tmp_path):
    sets = [a for key, value in CPU_SIZED.items() for a in ("--set", f"{key}={value}")]
    logs = f"{tmp_path}/logs/{{run_name}}-rank{{rank}}.txt"
    result = mates("run", "gpu", "--set", f"data={local_pool}", "--set", f"run={tmp_path}/run", *sets,
                   "--set", f"loggers.file.filename={logs}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_parquet(f"{tmp_path}/run", "metrics.parquet").to_pylist()
    assert sorted({m["stage"] for m in metrics}) == [-1, 0, 1] and metrics[-1]["batches_seen"] == 5
    for stage, n in ((0, 3), (1, 2)):
        text = (tmp_path / "logs" / f"run-stage-{stage}-rank0.txt").read_text()
        assert len(re.findall(r"lr-AdamW/group0", text)) == n           # callbacks.lr_monitor
        assert "throughput/batches_per_sec" in text                        # callbacks.speed_monitor
        assert re.search(r"device_train_microbatch_size: 4", text), text[:2000]
