"""A boundary longer than the process group's timeout does not end a multi-rank run.

Rank 0 curates while the other ranks wait for the stage's `_SUCCESS` in the store (a file has
no clock); a barrier there timed out after `dist_timeout_s` and the launcher ended the run.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from schemas.storage import join, read_parquet, store_for
from tests.conftest import MICRO_RECIPE, ROOT, free_port

TIMEOUT_S, DELAY_S = 8, 14   # rank 0's first boundary outlasts every collective's clock


def _launch(data: str, run: str, env: dict) -> subprocess.Popen:
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    return subprocess.Popen([composer, "-n", "2", "--master_port", str(free_port()), "-m", "jobs.cli", "run",
                             MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={run}",
                             "--set", f"dist_timeout_s={TIMEOUT_S}", "--set", "stages.count=1", "--set", "stages.batches=[4]"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})


@pytest.mark.slow
def test_rank0_boundary_past_the_collective_timeout_finishes_as_undelayed(local_pool, tmp_path):
    runs = {name: str(tmp_path / name) for name in ("slow", "fast")}
    procs = {"slow": _launch(local_pool, runs["slow"], {"MATES_DELAY": f"curate:{DELAY_S}"}),
             "fast": _launch(local_pool, runs["fast"], {})}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, out[-3000:])
    slow, fast = (read_parquet(runs[n], "metrics.parquet").to_pylist() for n in ("slow", "fast"))
    by_stage = {m["stage"]: m for m in slow if m["eval_set"] == "wiki_en"}
    assert by_stage[0]["curation_seconds"] >= DELAY_S > TIMEOUT_S   # the delay did outlast the clock
    assert by_stage[0]["batches_seen"] == 4
    for stage in (0,):
        a, b = (read_parquet(join(runs[n], "stages", str(stage)), "selection.parquet") for n in ("slow", "fast"))
        assert a.equals(b), stage
    assert [(m["stage"], m["eval_set"], m["tokens_seen"]) for m in slow] == \
        [(m["stage"], m["eval_set"], m["tokens_seen"]) for m in fast]
    np.testing.assert_allclose([m["loss"] for m in slow], [m["loss"] for m in fast], rtol=0, atol=1e-5)


class _SlowPrepare:
    """A data-parallel method whose `prepare` (rank 0) takes longer than the other rank waits."""

    name, parallel_scoring, n_buckets, standardize_for_selection = "slow", True, 2, False

    def prepare(self, ctx):
        import time

        time.sleep(1.5)

    def score_slice(self, ctx, ids):
        return np.asarray(ids, dtype=np.float64) * 0.5


def test_parallel_scoring_waits_on_markers_not_a_barrier(local_pool, tmp_path, monkeypatch):
    """Rank 1 waits for rank 0's `prepare` through the stage's `_PREPARED`, rank 0 for rank 1's part
    through the part itself; the only barrier left is the one right after rank 0's clean-up."""
    from curation import stage_job
    from curation.methods.base import StageContext
    from curation.methods.random_method import RandomMethod

    class Slow(_SlowPrepare, RandomMethod):
        pass

    monkeypatch.setattr(stage_job, "get_method", lambda name: Slow())
    run = str(tmp_path / "run")
    ids = np.arange(0, 40, 2)
    barrier, waits, out = threading.Barrier(2), [], {}

    def timed_barrier():
        waits.append(1)
        barrier.wait(timeout=1.0)   # shorter than prepare: a barrier around it would break

    def rank(r):
        ctx = StageContext(run_url=run, data_url=local_pool, stage=0, candidates=ids, n_select=10, seed=1,
                           options=type("O", (), {"temperature": 0.5})(), log=lambda m: None)
        out[r] = stage_job.run_stage_job(ctx, "slow", rank=r, world_size=2, barrier=timed_barrier)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out[0]["skipped"] is False and out[1] == {"skipped": False} and len(waits) == 2
    stage = join(run, "stages", "0")
    assert store_for(stage).exists("_SUCCESS") and store_for(stage).exists("_PREPARED")
    parts = [read_parquet(stage, "scores", f"part-0000{r}.parquet") for r in (0, 1)]
    assert [p.num_rows for p in parts] == [10, 10]
    pred = np.concatenate([np.asarray(p.column("prediction")) for p in parts])
    np.testing.assert_allclose(pred, ids * 0.5)
