"""Every rank works at a boundary (curation/stage_job.py): 2 ranks give 1 rank's selection, scores,
audit and stage index (the same samples in the same order in every bucket) for every method, and a
rank that fails is named by the others instead of waited on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest

from schemas.storage import join, read_parquet, store_for
from tests.conftest import MICRO_RECIPE, ROOT, free_port
from tests.stage_ranks_worker import METHODS

PARALLEL = {"perplexity", "dsir", "classifier", "mates", "group_mates"}   # score their slices on each rank


def _bucket_ids(stage: str) -> dict[str, list[int]]:
    """Bucket -> the sample ids its MDS folder holds, in stream order (read through index.json)."""
    from curation.store.pool import MDSFolder

    manifest = json.loads(store_for(stage).read_bytes("index", "streams.json"))
    out = {}
    for entry in manifest["streams"]:
        folder = MDSFolder(join(stage, "index", entry["path"]))
        out[entry["name"]] = [int(folder[i]["sample_id"]) for i in range(len(folder))]
        assert len(folder) == entry["samples"], entry
    return out


def _scores(stage: str) -> pa.Table:
    parts = sorted(store_for(stage).listdir("scores"))
    return pa.concat_tables([read_parquet(stage, "scores", p) for p in parts])


def _counts(marker: dict) -> dict:
    """What adds up over ranks: the ledger's token counts. Not the reference passes (one per rank
    that probes), nor the embedding pass's tokens and the embeddings read or computed: 2 ranks
    computed the embeddings that 1 rank then reuses, and a rank whose probes spread over its
    candidates' store parts reads the candidates once for fitting and scoring (mates_method)."""
    per_world = ("curation/ledger/probe_reference_tokens", "curation/ledger/embed_")
    out = {k: v for k, v in marker.items() if k.startswith("curation/ledger/") and k.endswith("_tokens")
           and not k.startswith(per_world)}
    return out


@pytest.fixture(scope="module")
def stage_runs(local_pool, tmp_path_factory):
    """Every method's boundary on 2 ranks (2 processes, a gloo group), then on 1 rank in this process,
    over one copy of the pool: the 2 ranks embed the candidates into its store (`@frozen`), 1 rank
    reuses them."""
    from jobs.bench_probe import toy_probe_state
    from schemas.probe_state import save_probe_state
    from schemas.recipe import load_recipe
    from tests.stage_ranks_worker import run_all

    root = tmp_path_factory.mktemp("stage-ranks")
    data = str(root / "data")
    shutil.copytree(local_pool, data)
    recipe = load_recipe(MICRO_RECIPE)
    save_probe_state(toy_probe_state(recipe.model, recipe.tokenizer.vocab_size), str(root), "state.pt")
    state = str(root / "state.pt")
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.stage_ranks_worker", data, state, str(root / "two")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [out[-3000:] for out in outputs]
    run_all(data, state, str(root / "one"), 0, 1, lambda: None)
    return root


@pytest.mark.parametrize("name", list(METHODS))
def test_two_ranks_give_one_ranks_boundary(stage_runs, name):
    method = METHODS[name][0]
    one, two = (join(str(stage_runs), n, name, "stages", "1") for n in ("one", "two"))
    assert read_parquet(two, "selection.parquet").equals(read_parquet(one, "selection.parquet"))
    assert _scores(two).equals(_scores(one))   # predictions, clusters and global ranks
    assert read_parquet(two, "audit.parquet").equals(read_parquet(one, "audit.parquet"))
    # the index: the same samples in the same order in every bucket (a dropped or misordered share fails)
    buckets = _bucket_ids(one)
    assert _bucket_ids(two) == buckets and sum(map(len, buckets.values())) == 40
    streams = [[{k: v for k, v in e.items() if k != "remote"}   # the remote names the run
                for e in json.loads(store_for(s).read_bytes("index", "streams.json"))["streams"]] for s in (one, two)]
    assert streams[1] == streams[0]
    markers = [json.loads(store_for(s).read_bytes("_SUCCESS")) for s in (one, two)]
    assert _counts(markers[1]) == _counts(markers[0])
    for marker in markers:   # every candidate's embedding was read or computed (the frozen runs)
        embedded = marker.get("curation/embed/computed", 0) + marker.get("curation/embed/reused", 0)
        assert embedded == 0 or embedded >= 120, embedded
    # ... written by both ranks: each bucket holds a share of each (rank 0 merged their index.json);
    # `@tree`'s 80 buckets hold ~1 sample each: a bucket's share may lie on one rank
    both, writers = ["rank-00000", "rank-00001"], set()
    for bucket, ids in buckets.items():
        names = [s["raw_data"]["basename"] for s in
                 json.loads(store_for(two).read_bytes("index", bucket, "index.json"))["shards"]]
        mine = [n.split(".")[0] for n in names]
        assert mine == (sorted(set(mine)) if name.endswith("@tree") else both), (bucket, names)
        writers.update(mine)
        assert not any(n.startswith("rank-") for n in store_for(one).listdir("index", bucket))
    assert sorted(writers) == both
    assert markers[1]["score_parts"] == (2 if method in PARALLEL else 1)
    if method == "group_mates":   # rank 1 embedded and scored its slice; rank 0 clustered them all
        assert store_for(two).exists("ranks", "embeddings-00001.npy")
        # a tree's groups are dealt: rank 1 clustered some and ran the greedy in their clusters; one
        # group (a flat k-means) stays on rank 0, rank 1 only reads its empty share
        tree = name.endswith("@tree")
        dealt = [store_for(two).exists("ranks", f"{kind}-00001.npy") for kind in ("labels", "picks")]
        assert dealt == [tree, tree] and store_for(two).exists("ranks", "share-00001.npz")
        assert markers[1]["curation/group/ranks_dealt"] == (2 if tree else 1)
        assert (markers[1]["curation/group/tree_groups"] > 1) == tree


class _Failing:
    """A data-parallel method that raises at `where`: rank 0's `prepare`, rank 1's slice, or rank 0's
    selection (after rank 1 has written its share of the index and waits for the commit)."""

    name, parallel_scoring, n_buckets, standardize_for_selection = "failing", True, 2, False

    def __init__(self, where: str):
        self.where = where

    def prepare(self, ctx):
        if self.where == "prepare":
            raise ValueError("bad fit")

    def score_slice(self, ctx, ids):
        if ids[0] != ctx.candidates[0] and self.where == "slice":
            raise ValueError("bad slice")
        return np.asarray(ids, dtype=np.float64)

    def select(self, ctx, pred):
        if self.where == "select":
            raise ValueError("bad selection")
        return super().select(ctx, pred)


@pytest.mark.parametrize("where, fail_on", [("prepare", 0), ("slice", 1), ("select", 0)])
def test_a_failing_rank_is_named_by_the_other(local_pool, tmp_path, monkeypatch, where, fail_on):
    """Ranks in threads: the one that fails writes ranks/failed-<rank>.txt; the other raises
    naming it rather than wait on its marker; nothing is committed."""
    from curation import stage_job
    from curation.methods.base import StageContext
    from curation.methods.random_method import RandomMethod
    from curation.store.rank_files import PeerFailed

    class Failing(_Failing, RandomMethod):
        pass

    monkeypatch.setattr(stage_job, "get_method", lambda name: Failing(where))
    run, barrier, errors = str(tmp_path / "run"), threading.Barrier(2), {}

    def rank(r):
        ctx = StageContext(run_url=run, data_url=local_pool, stage=0, candidates=np.arange(20), n_select=5, seed=1,
                           options=type("O", (), {"temperature": 0.5})(), log=lambda m: None)
        try:
            stage_job.run_stage_job(ctx, "failing", rank=r, world_size=2, barrier=lambda: barrier.wait(timeout=10))
        except Exception as exc:  # noqa: BLE001 - what each rank raised, checked below
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    other = 1 - fail_on
    assert isinstance(errors[fail_on], ValueError)
    assert isinstance(errors[other], PeerFailed) and f"rank(s) [{fail_on}] failed" in str(errors[other])
    stage = join(run, "stages", "0")
    assert store_for(stage).exists("ranks", f"failed-{fail_on:05d}.txt") and not store_for(stage).exists("_SUCCESS")
