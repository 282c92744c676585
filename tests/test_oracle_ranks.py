"""The oracle on every rank (curation/oracle/ranks.py): probes and trajectories dealt in whole
chunks, merged by rank 0, equal to one rank's; a failing rank is reported by every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from curation.oracle.ranks import dealt, on_ranks
from schemas.errors import MatesError
from tests.conftest import ROOT, free_port


def test_dealt_gives_whole_chunks_covering_every_row_once():
    for n, chunk, world in [(14, 4, 2), (5, 2, 2), (3, 4, 2), (100, 16, 8), (0, 4, 3)]:
        spans = [dealt(n, chunk, r, world) for r in range(world)]
        rows = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
        assert np.array_equal(rows, np.arange(n))
        assert all(lo % chunk == 0 or lo == hi for lo, hi in spans)  # a rank starts on a chunk boundary
    assert [dealt(14, 4, r, 2) for r in (0, 1)] == [(0, 8), (8, 14)]
    with pytest.raises(MatesError, match="`rank` must be in"):
        dealt(4, 2, 2, 2)


def test_a_failing_rank_is_reported_by_every_rank(tmp_path):
    """Ranks run in turn here (the barrier is a no-op): rank 1 fails first, rank 0 then raises too."""
    url = str(tmp_path / "stage")

    def compute(lo, hi):
        raise ValueError("bad sample")

    with pytest.raises(MatesError, match=r"failed on rank\(s\) \[1\] of 2; rank 1: ValueError: bad sample"):
        on_ranks(url, "probes", 8, chunk=2, rank=1, world_size=2, barrier=lambda: None, compute=compute)
    with pytest.raises(MatesError, match=r"failed on rank\(s\) \[1\] of 2"):
        on_ranks(url, "probes", 8, chunk=2, rank=0, world_size=2, barrier=lambda: None,
                 compute=lambda lo, hi: pa.table({"x": np.arange(lo, hi)}))


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path):
    """`composer -n 2` (gloo): forward probes and trajectories dealt to 2 ranks equal 1 rank's to 1e-6."""
    from tests.oracle_ranks_worker import compute_all

    out = tmp_path / "two"
    out.mkdir()
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    result = subprocess.run([composer, "-n", "2", "--master_port", str(free_port()), "-m",
                             "tests.oracle_ranks_worker", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    probes, trajectories = compute_all(str(tmp_path / "one"), 0, 1, lambda: None)
    two_probes, two_traj = np.load(out / "probes.npy"), np.load(out / "trajectories.npy")
    assert probes.shape == (14,) and trajectories.shape == (5, 3) and np.abs(probes).max() > 0
    assert np.abs(two_probes - probes).max() <= 1e-6 * np.abs(probes).max()
    assert np.abs(two_traj - trajectories).max() <= 1e-6 * np.abs(trajectories).max()
    # each rank wrote its own part: rank 0 the first two chunks of probes, rank 1 the rest
    parts = sorted(os.listdir(out / "stage" / "oracle"))
    assert "probes-part-00000.parquet" in parts and "trajectories-part-00001.parquet" in parts
    # the last rank failed a part: both ranks returned (no hang) and both name it
    for rank in (0, 1):
        message = json.loads((out / f"failure-{rank}.json").read_text())
        assert "failed on rank(s) [1] of 2; rank 1: RuntimeError: injected failure" in message


def test_group_mates_oracle_parts_of_two_ranks_equal_one_process(local_pool, tmp_path):
    """GroupMatesMethod.oracle_part on 2 ranks (run in turn here, the barrier a no-op: rank 1 first,
    then rank 0 merges) gives the probes and trajectories that one process computes itself."""
    from curation.data.tokenizer import EOS, load_pool_tokenizer
    from curation.methods.base import StageContext
    from curation.methods.group_mates_method import GroupMatesMethod
    from curation.store.pool import MDSFolder
    from jobs.bench_probe import toy_probe_state
    from schemas.method_options import GroupMatesOptions
    from schemas.probe_state import save_probe_state
    from schemas.recipe import load_recipe
    from tests.conftest import MICRO_RECIPE

    recipe = load_recipe(MICRO_RECIPE)
    save_probe_state(toy_probe_state(recipe.model, recipe.tokenizer.vocab_size), str(tmp_path), "state.pt")
    opts = GroupMatesOptions(probe_method="forward", n_probes=10, probe_batch=4, max_target=4, n_trajectories=10,
                             trajectory_length=2, trajectory_batch=3, trajectory_reference=2)

    def ctx(run: str) -> StageContext:
        return StageContext(run_url=str(tmp_path / run), data_url=local_pool, stage=1, candidates=np.arange(300),
                            n_select=10, seed=0, options=opts, state_url=str(tmp_path / "state.pt"),
                            target="wiki_en", log=lambda m: None)

    one = GroupMatesMethod()
    pool, pad = MDSFolder(f"{local_pool}/pool"), load_pool_tokenizer(local_pool).token_to_id(EOS)
    one_ctx, two_ctx = ctx("one"), ctx("two")
    ids, influence = one.probe(one_ctx, pool, pad)
    traj_ids, increments = one.group_oracle(one_ctx, pool, pad)
    GroupMatesMethod().oracle_part(ctx("two"), 1, 2, lambda: None)
    rank0 = GroupMatesMethod()
    rank0.oracle_part(two_ctx, 0, 2, lambda: None)
    assert len(ids) == 10 and increments.shape == (10, 2) and np.abs(influence).max() > 0
    assert np.array_equal(rank0.merged_probes[0], ids)
    assert np.abs(rank0.merged_probes[1] - influence).max() <= 1e-6 * np.abs(influence).max()
    assert np.array_equal(rank0.merged_trajectories[0], traj_ids)
    assert np.abs(rank0.merged_trajectories[1] - increments).max() <= 1e-6 * np.abs(increments).max()
    parts = sorted(os.listdir(tmp_path / "two" / "stages" / "1" / "oracle"))
    assert parts == ["probes-part-00000.parquet", "probes-part-00001.parquet",
                     "trajectories-part-00000.parquet", "trajectories-part-00001.parquet"]
    # the compute ledger counts the merged table (every rank's probes and trajectory steps) and one
    # reference gradient per rank that probed: 10 probes in chunks of 4 give rank 0 two, rank 1 one
    from curation.compute import probe_flops

    rank0.probe(two_ctx, pool, pad)
    rank0.group_oracle(two_ctx, pool, pad)
    one_m, two_m = one_ctx.metrics, two_ctx.metrics
    for key in ("probe_tokens", "trajectory_steps", "trajectory_tokens", "trajectory_reference_tokens"):
        assert two_m[f"curation/ledger/{key}"] == one_m[f"curation/ledger/{key}"] > 0, key
    reference = one_m["curation/ledger/probe_reference_tokens"]
    assert two_m["curation/ledger/probe_reference_tokens"] == 2 * reference
    assert two_ctx.flops["probe"] == probe_flops(rank0.lm_shape, "forward", reference_tokens=2 * reference,
                                                 probe_tokens=one_m["curation/ledger/probe_tokens"])
    assert two_ctx.flops["group_oracle"] == one_ctx.flops["group_oracle"] > 0
