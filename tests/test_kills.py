"""SIGKILL at every phase of a stage boundary, then `mates run` again: the run finishes with the
outputs of an uninterrupted one, and no reader ever sees a half-written stage.

One chain of runs: each is killed at the next phase (failpoints, curation/failpoints.py), and the
next run resumes from what the killed one committed; the last run has no failpoint."""
import os

import pytest

from curation.failpoints import NAMES
from curation.store.stage_index import read_stage_streams
from schemas.errors import MatesError
from schemas.storage import join, read_parquet
from tests.conftest import MICRO_RECIPE, mates, mates_process

pytestmark = pytest.mark.slow
# Every run after the first re-probes stage 1, so few probes on few target examples (16 probes:
# the influence model's least, 10, plus room for its held-out split). Shorter than the micro
# recipe's stages (30 + 20 batches, 400 candidates): the kills only need stage 0 to train past
# batch 2 and stage 1 to curate with every phase reached.
OPTIONS = ("stages.options={n_probes: 16, probe_batch: 16, encoder_layers: 1, encoder_max_len: 32, "
           "epochs: 1, max_target: 8, batch_size: 16}")
SMALL = ("--set", "stages.batches=[8, 4]", "--set", "stages.pool_per_stage=200")


def run(data: str, run_url: str, failpoint: str | None = None):
    """`mates run`: killed at `failpoint` in a child process, or in this process when there is none."""
    args = ("run", MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={run_url}",
            "--set", "stages.method=mates", "--set", OPTIONS, *SMALL)
    return mates_process(*args, env={"MATES_FAILPOINT": failpoint}) if failpoint else mates(*args)


def committed(run_url: str) -> list[int]:
    result = mates("query", run_url, "SELECT DISTINCT stage FROM selection ORDER BY stage", "--csv", "-")
    assert result.returncode == 0, result.stderr[-1500:]
    return [int(x) for x in result.stdout.split()[1:]]


def test_kill_at_every_phase_then_resume(local_pool, tmp_path):
    clean = str(tmp_path / "clean")
    result = run(local_pool, clean)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = str(tmp_path / "killed")
    for phase in NAMES:
        result = run(local_pool, killed, phase)
        assert result.returncode == -9, (phase, result.stderr[-1500:])
        # readers see whole stages only: stage 1 appears only once its _SUCCESS is written
        assert os.path.exists(os.path.join(killed, "recipe.yaml"))
        stages = committed(killed)
        assert stages == [0], (phase, stages)  # stage 0 is committed before it trains
        if phase == "commit":  # index and streams.json are written, _SUCCESS is not
            assert os.path.exists(os.path.join(killed, "stages", "1", "index", "streams.json"))
            with pytest.raises(MatesError, match="not committed"):
                read_stage_streams(killed, 1)  # what `mates run` trains from
    result = run(local_pool, killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed(killed) == [0, 1]
    for stage in (0, 1):
        a = read_parquet(join(clean, "stages", str(stage)), "selection.parquet")
        b = read_parquet(join(killed, "stages", str(stage)), "selection.parquet")
        assert a.equals(b), stage
    probes = [read_parquet(join(r, "stages", "1"), "probes.parquet") for r in (clean, killed)]
    assert probes[0].equals(probes[1])
    ma, mb = (read_parquet(r, "metrics.parquet").to_pylist() for r in (clean, killed))
    assert [(m["stage"], m["eval_set"]) for m in ma] == [(m["stage"], m["eval_set"]) for m in mb]
    assert [m["stage"] for m in ma if m["eval_set"] == "wiki_en"] == [-1, 0, 1]
    for x, y in zip(ma, mb):
        assert x["tokens_seen"] == y["tokens_seen"] and abs(x["loss"] - y["loss"]) < 1e-5
