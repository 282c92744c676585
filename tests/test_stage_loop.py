"""The stage loop end to end on the local S3 server: files, streams, learning, resume, 2 ranks."""
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.storage import join, read_parquet, store_for
from tests.conftest import MICRO_RECIPE, ROOT, free_port, mates

pytestmark = pytest.mark.slow


def run_micro(data: str, run: str, *extra: str):
    return mates("run", MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={run}", *extra)


def test_run_writes_the_design_layout(clean_run):
    run, result = clean_run
    store = store_for(run)
    for rel in ["recipe.yaml", "metrics.parquet", "checkpoints/stage-0.pt", "checkpoints/stage-0-state.pt",
                "checkpoints/stage-1.pt", "checkpoints/stage-1-state.pt"]:
        assert store.exists(rel), rel
    for stage in (0, 1):
        for rel in ["selection.parquet", "scores/part-00000.parquet", "index/streams.json",
                    "index/streams.yaml", "index/b000/index.json", "_SUCCESS"]:
            assert store.exists(f"stages/{stage}/{rel}"), (stage, rel)
    assert "eval loss per set" in result.stderr and "wiki_en_cloze*" in result.stderr  # the metrics table


def test_stage_index_is_plain_streaming(clean_run, tmp_path):
    """Another trainer reads the stage index with mosaicml-streaming alone and gets the selection."""
    import json

    from streaming import Stream, StreamingDataset

    run, _ = clean_run
    stage = join(run, "stages", "1")
    manifest = json.loads(store_for(stage).read_bytes("index", "streams.json"))
    streams = [Stream(remote=s["remote"], local=str(tmp_path / s["name"]), proportion=s["proportion"])
               for s in manifest["streams"]]
    dataset = StreamingDataset(streams=streams, shuffle=False, batch_size=1)
    selection = read_parquet(stage, "selection.parquet")
    selected = set(np.asarray(selection.filter(selection.column("selected")).column("sample_id")).tolist())
    assert len(dataset) == len(selected) == round(0.5 * 400)
    assert {int(dataset[i]["sample_id"]) for i in range(len(dataset))} == selected
    assert abs(sum(s["proportion"] for s in manifest["streams"]) - 1) < 1e-9


def test_candidate_pools_are_disjoint_and_model_learns(clean_run):
    run, _ = clean_run
    sel0 = read_parquet(join(run, "stages", "0"), "selection.parquet")
    sel1 = read_parquet(join(run, "stages", "1"), "selection.parquet")
    assert not set(sel0.column("sample_id").to_pylist()) & set(sel1.column("sample_id").to_pylist())
    metrics = read_parquet(run, "metrics.parquet").to_pylist()
    assert [(m["stage"], m["eval_set"]) for m in metrics] == [(s, e) for s in (-1, 0, 1)
                                                              for e in ("wiki_en", "wiki_en_cloze", "bbc_en")]
    by_stage = {m["stage"]: m for m in metrics if m["eval_set"] == "wiki_en"}
    assert by_stage[1]["loss"] < by_stage[-1]["loss"] - 0.3
    assert by_stage[1]["batches_seen"] == 50 and by_stage[1]["tokens_seen"] > by_stage[0]["tokens_seen"] > 0


def test_sigkill_in_stage_1_then_resume_matches(clean_run, s3_pool, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mates-run-killed")
    run = "s3://mates-run-killed/run"
    cmd = [sys.executable, "-m", "jobs.cli", "run", MICRO_RECIPE, "--set", f"data={s3_pool}", "--set", f"run={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("  stage 1 batch"):  # training stage 1 is under way
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
    store = store_for(run)
    assert store.exists("stages/1/_SUCCESS") and not store.exists("checkpoints/stage-1-state.pt")

    result = run_micro(s3_pool, run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 0: already trained" in result.stderr
    clean, _ = clean_run
    for stage in (0, 1):
        a = read_parquet(join(clean, "stages", str(stage)), "selection.parquet")
        b = read_parquet(join(run, "stages", str(stage)), "selection.parquet")
        assert a.equals(b), stage
    ma = read_parquet(clean, "metrics.parquet").to_pylist()
    mb = read_parquet(run, "metrics.parquet").to_pylist()
    for x, y in zip(ma, mb):  # training resumed from the committed state is the same training
        assert x["stage"] == y["stage"] and x["tokens_seen"] == y["tokens_seen"]
        assert x["eval_set"] == y["eval_set"] and abs(x["loss"] - y["loss"]) < 1e-5, (x, y)


def test_rerun_of_finished_run_recomputes_nothing(clean_run, s3_pool):
    run, _ = clean_run
    before = store_for(run).read_bytes("stages/1/_SUCCESS")
    result = run_micro(s3_pool, run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage 1: already trained" in result.stderr
    assert store_for(run).read_bytes("stages/1/_SUCCESS") == before


def test_other_recipe_in_same_run_is_refused(clean_run, s3_pool):
    run, _ = clean_run
    result = run_micro(s3_pool, run, "--set", "seed=3")
    assert result.returncode == 2 and "another recipe" in result.stderr


# What the launcher test needs of `mates`: a probed, fitted influence model to score with (few
# probes on few target examples; the quality of the fit is test_mates_e2e's).
DDP_OPTIONS = ("stages.options={n_probes: 24, probe_batch: 12, encoder_layers: 1, encoder_max_len: 64, "
               "epochs: 1, max_target: 8, batch_size: 16}")


def test_two_process_launcher_scores_data_parallel(s3_pool, s3_server, tmp_path):
    """`composer -n 2` runs the loop with gloo and `method: mates`: each rank probes its half of the
    probes, rank 0 fits, each rank scores its half of the candidates into its own part, rank 0
    selects and writes the index; `tokens_seen` is the sum of the tokens each rank trained on (its
    file logger's count)."""
    import boto3

    from curation.influence.finetuned import InfluenceModel
    from curation.data.tokenizer import load_pool_tokenizer
    from curation.influence.scoring import score_samples

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mates-run-ddp")
    run = "s3://mates-run-ddp/run"
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    result = subprocess.run([composer, "-n", "2", "--master_port", str(free_port()), "-m", "jobs.cli", "run",
                             MICRO_RECIPE, "--set", f"data={s3_pool}", "--set", f"run={run}",
                             "--set", "stages.method=mates", "--set", DDP_OPTIONS, "--set", "stages.batches=[8, 4]",
                             "--set", f"loggers={{file: {{filename: '{tmp_path}/{{run_name}}-rank{{rank}}.txt'}}}}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    metrics = read_parquet(run, "metrics.parquet").to_pylist()
    assert [m["stage"] for m in metrics if m["eval_set"] == "wiki_en"] == [-1, 0, 1]
    assert metrics[-1]["batches_seen"] == 12
    per_rank = [[int(re.findall(r"train/tokens_seen: (\d+)", (tmp_path / f"run-stage-{k}-rank{r}.txt").read_text())[-1])
                 for r in (0, 1)] for k in (0, 1)]
    assert metrics[-1]["tokens_seen"] == sum(map(sum, per_rank)), per_rank  # not rank 0's count x 2
    # 2 ranks x 4 samples per batch = the recipe's global batch of 8: same tokens budget as 1 rank
    wiki = [m["loss"] for m in metrics if m["eval_set"] == "wiki_en"]
    assert wiki[-1] < wiki[0]
    stage = join(run, "stages", "1")
    assert pq.read_table(store_for(run).fs.open(store_for(run).path("stages/1/selection.parquet"))).num_rows == 400
    assert sorted(store_for(stage).listdir("scores")) == ["part-00000.parquet", "part-00001.parquet"]
    # the probes were dealt to both ranks (24 probes in chunks of 12: one chunk each), rank 0 merged them
    assert [n for n in store_for(stage).listdir("oracle") if n.startswith("probes-")] == \
        ["probes-part-00000.parquet", "probes-part-00001.parquet"]
    assert store_for(stage).listdir("oracle").count("ledger-part-00001.json") == 1  # rank 1's scoring FLOPs
    assert [read_parquet(stage, "oracle", f"probes-part-0000{r}.parquet").num_rows for r in (0, 1)] == [12, 12]
    assert read_parquet(stage, "probes.parquet").num_rows == 24
    parts = [read_parquet(stage, "scores", f"part-0000{r}.parquet") for r in (0, 1)]
    assert [p.num_rows for p in parts] == [200, 200]
    ids = np.concatenate([np.asarray(p.column("sample_id")) for p in parts])
    pred = np.concatenate([np.asarray(p.column("prediction")) for p in parts])
    ranks = np.concatenate([np.asarray(p.column("rank")) for p in parts])
    assert np.array_equal(np.sort(ranks), np.arange(400))  # global ranks, written back by rank 0
    # each rank's predictions are the saved influence model's, as one process computes them
    model = InfluenceModel.from_pretrained(join(stage, "influence_model"))
    expected = score_samples(model, join(s3_pool, "pool"), ids, load_pool_tokenizer(s3_pool), batch_size=64)
    np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-5)
    assert "\"score_parts\": 2" in store_for(stage).read_bytes("_SUCCESS").decode()
