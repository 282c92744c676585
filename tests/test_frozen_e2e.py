"""`influence_model.backbone: frozen` end to end on the micro recipe, over the local S3 server:
mates embeds the candidates it touches into the pool's store; group_mates, run next over the
same pool with the same encoder settings, computes no new embedding."""
import json

import numpy as np
import pytest

from curation.influence.embeddings import EmbeddingSettings, EmbeddingStore
from curation.influence.frozen_head import FrozenHead
from schemas.costs import PHASES, stage_costs
from schemas.storage import join, read_parquet, store_for
from tests.conftest import mates
from tests.test_mates_e2e import assert_ledger, method_run

pytestmark = pytest.mark.slow
ENCODER = "encoder_layers: 1, encoder_max_len: 64"
N_PROBES = 32  # exact probes dominate the cost; the head needs 10 (a 29/3 split here)
MATES = (f"stages.options={{backbone: frozen, n_probes: {N_PROBES}, probe_batch: 16, {ENCODER}, max_target: 16, "
         "head_epochs: 40}")
GROUP = (f"stages.options={{backbone: frozen, n_probes: 32, probe_batch: 16, {ENCODER}, max_target: 16, "
         "head_epochs: 40, n_trajectories: 12, trajectory_length: 4, relational_epochs: 50, n_clusters: 4}")


def frozen_run(s3_server: str, s3_pool: str, method: str, options: str):
    run, result = method_run(s3_server, s3_pool, method, options, prefix="mates-frozen")
    marker = json.loads(store_for(join(run, "stages", "1")).read_bytes("_SUCCESS"))
    return run, result, marker


@pytest.fixture(scope="module")
def mates_frozen(s3_pool, s3_server):
    return frozen_run(s3_server, s3_pool, "mates", MATES)


@pytest.fixture(scope="module")
def group_frozen(mates_frozen, s3_pool, s3_server):  # after mates: the store then holds every candidate
    return frozen_run(s3_server, s3_pool, "group_mates", GROUP)


def test_mates_frozen_embeds_the_candidates_and_scores_with_the_head(mates_frozen, s3_pool):
    run, result, marker = mates_frozen
    stage = join(run, "stages", "1")
    assert marker["curation/influence/backbone"] == "frozen"
    # the 400 candidates of stage 1 (the probes among them) were embedded once, at this boundary
    assert (marker["curation/embed/computed"], marker["seconds_embed"] > 0) == (400, True)
    assert store_for(stage).exists("frozen_head", "frozen_head.json")
    assert not store_for(stage).exists("influence_model")
    assert np.isfinite(marker["curation/influence/val_spearman"])
    # frozen scoring = the saved head applied to the stored embeddings of the candidates
    scores = read_parquet(stage, "scores", "part-00000.parquet")
    ids = np.asarray(scores.column("sample_id"))
    store = EmbeddingStore(s3_pool, EmbeddingSettings(layers_kept=1, max_len=64))
    want = FrozenHead.load(join(stage, "frozen_head")).predict(store.load(ids))
    got = np.asarray(scores.column("prediction"), dtype=np.float64)
    assert len(ids) == 400 and np.std(got) > 0
    assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max())  # float32 column
    # costs: every phase in the marker and the console summary; the phases add up to the total
    costs = stage_costs(marker)
    assert all(costs[p] >= 0 for p in PHASES) and costs["probe"] > 0 and costs["index"] > 0
    assert abs(sum(costs[p] for p in PHASES) - marker["curation_seconds"]) < 1e-6
    assert marker["train_seconds_expected"] > 0
    assert abs(marker["curation_share_of_training"] - marker["curation_seconds"] / marker["train_seconds_expected"]) < 1e-9
    assert "curation seconds per phase" in result.stderr
    # the probes' embeddings before the fit, then the rest of the candidates' before scoring
    assert f"embedded {N_PROBES} new samples" in result.stderr
    assert f"embedded {400 - N_PROBES} new samples" in result.stderr
    # the ledger: the embedding pass is the encoder's only work; the head and scoring count 0
    _, phases = assert_ledger(run, marker)
    assert phases["embed"] > 0 and (phases["fit"], phases["score"]) == (0.0, 0.0)


def test_group_mates_frozen_reuses_the_stored_embeddings(group_frozen):
    run, result, marker = group_frozen
    stage = join(run, "stages", "1")
    assert marker["curation/influence/backbone"] == "frozen"
    assert (marker["curation/embed/computed"], marker.get("seconds_embed", 0.0)) == (0, 0.0)
    assert marker["curation/embed/reused"] >= 400   # candidates, probes and trajectories all stored
    assert "embedded" not in result.stderr
    scores = read_parquet(stage, "scores", "part-00000.parquet")
    assert set(scores.column("cluster").to_pylist()) == {0, 1, 2, 3}
    assert marker["seconds_cluster"] > 0 and marker["seconds_select"] > 0
    selection = read_parquet(stage, "selection.parquet")
    assert selection.filter(selection.column("selected")).num_rows == 200
    assert store_for(stage).exists("relational_model", "relational_model.json")
    # every embedding was stored: no encoder work at all, only the LM's probes and trajectories
    _, phases = assert_ledger(run, marker)
    assert "embed" not in phases and phases["group_oracle"] > 0
    assert (phases["fit"], phases["relational_fit"], phases["score"]) == (0.0, 0.0, 0.0)


def test_report_plots_curation_costs(mates_frozen, group_frozen, tmp_path):
    from tests.test_compare_report import _assert_valid_pngs

    run, _, _ = group_frozen
    result = mates("report", run, "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert _assert_valid_pngs(str(tmp_path / "report" / "index.html"))[-2:] == ["costs.png", "compute.png"]
    assert "curation / training" in (tmp_path / "report" / "index.html").read_text()


def test_query_reads_the_embedding_store_and_the_phase_costs(mates_frozen, group_frozen):
    run, _, marker = mates_frozen
    sql = ("SELECT count(DISTINCT sample_id) AS n, min(len(embedding)) AS dim FROM embeddings "
           "WHERE encoder = 'all-MiniLM-L6-v2-L1-len64-fp32'")
    result = mates("query", run, sql, "--csv", "-")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[1] == "400,384"   # stage 1's candidates, once each
    result = mates("query", run, "SELECT seconds_embed, seconds_probe, curation_flops FROM stages WHERE stage = 1",
                   "--csv", "-")
    assert result.returncode == 0, result.stderr[-2000:]
    embed, probe, flops = (float(x) for x in result.stdout.strip().splitlines()[1].split(","))
    assert abs(embed - marker["seconds_embed"]) < 1e-6 and abs(probe - marker["seconds_probe"]) < 1e-6
    assert flops == pytest.approx(marker["curation_flops"], rel=1e-9) and flops > 0
