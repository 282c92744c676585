"""`method: mates` end to end on the local S3 server, through the CLI."""
import json

import numpy as np
import pytest

from curation.store.catalog import read_catalog
from schemas.storage import join, read_parquet, store_for
from tests.conftest import MICRO_RECIPE, mates

pytestmark = pytest.mark.slow
# Exact probes dominate a micro run's cost (each is a forward over max_target examples): 128 probes
# keep a held-out split to rank (115/13); 16 target examples instead of 32 halve their cost.
N_PROBES = 128
MATES_OPTIONS = (f"stages.options={{n_probes: {N_PROBES}, probe_batch: 16, encoder_layers: 1, encoder_max_len: 64, "
                 "epochs: 2, max_target: 16, batch_size: 16}")


def method_run(s3_server: str, s3_pool: str, method: str, options: str, prefix: str = "mates-run"):
    """The micro recipe with `method` and `options`, in a fresh bucket; (run URL, CLI result)."""
    import boto3

    bucket = f"{prefix}-{method.replace('_', '-')}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    run = f"s3://{bucket}/run"
    result = mates("run", MICRO_RECIPE, "--set", f"data={s3_pool}", "--set", f"run={run}",
                   "--set", f"stages.method={method}", "--set", options)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def assert_ledger(run: str, marker: dict) -> tuple:
    """The compute ledger of stage 1 (README "Compute ledger"): flops_probe is probe_flops of the
    recorded counts on the stage-0 state's shape, curation_flops the sum of the phases, and
    metrics.parquet's train_flops 3F x each stage's tokens. Returns (LM shape, flops phases)."""
    from curation.compute import probe_flops, training_flops
    from curation.methods.ledger import lm_shape
    from schemas.probe_state import load_probe_state

    lm = lm_shape(load_probe_state(join(run, "checkpoints"), "stage-0-state.pt"))
    method = read_parquet(join(run, "stages", "1"), "probes.parquet").column("method")[0].as_py()
    counts = {k: marker[f"curation/ledger/probe_{k}"] for k in ("tokens", "reference_tokens")}
    assert all(v > 0 for v in counts.values())
    assert marker["flops_probe"] == probe_flops(lm, method, probe_tokens=counts["tokens"],
                                                reference_tokens=counts["reference_tokens"])
    assert marker["curation/ledger/lm_forward_flops_per_token"] == lm.forward_per_token()
    phases = {k[len("flops_"):]: v for k, v in marker.items() if k.startswith("flops_")}
    assert marker["curation_flops"] == pytest.approx(sum(phases.values()), rel=1e-12)
    stages = {r["stage"]: r for r in read_parquet(run, "metrics.parquet").to_pylist()}
    for k in sorted(stages)[1:]:
        trained = stages[k]["tokens_seen"] - stages[k - 1]["tokens_seen"]
        assert trained > 0 and stages[k]["train_flops"] == pytest.approx(training_flops(lm, trained), rel=1e-12)
    return lm, phases


@pytest.fixture(scope="module")
def mates_run(s3_pool, s3_server):
    return method_run(s3_server, s3_pool, "mates", MATES_OPTIONS)


def test_mates_stage_writes_probes_model_and_scores(mates_run):
    run, result = mates_run
    stage = join(run, "stages", "1")
    probes = read_parquet(stage, "probes.parquet")
    assert probes.num_rows == N_PROBES and set(probes.column("method").to_pylist()) == {"exact"}
    assert np.all(np.isfinite(np.asarray(probes.column("influence"))))
    assert np.std(np.asarray(probes.column("influence"))) > 0  # the oracle separates samples
    assert store_for(stage).exists("influence_model", "influence_model.json")
    scores = read_parquet(stage, "scores", "part-00000.parquet")
    assert scores.num_rows == 400 and len(set(np.round(scores.column("prediction").to_pylist(), 6))) > 50
    marker = json.loads(store_for(stage).read_bytes("_SUCCESS"))
    # Logged, and positive on the micro data. Seeded and deterministic on the CPU; the micro oracle
    # is weak (DESIGN.md 6: the signal is faint this early), so this is a floor, not a quality bar.
    assert marker["method"] == "mates" and marker["curation/influence/val_spearman"] > 0
    assert "held-out Spearman" in result.stderr
    # the finetuned MiniLM: fitted on the probes (every epoch), then a forward over the candidates
    _, phases = assert_ledger(run, marker)
    assert set(phases) == {"probe", "fit", "score"} and phases["fit"] > 0 and phases["score"] > 0
    assert marker["curation/ledger/fit_encoder_fitted_tokens"] == marker["curation/influence/fitted_tokens"] > 0


def test_mates_index_holds_exactly_the_selection(mates_run, tmp_path):
    from streaming import Stream, StreamingDataset

    run, _ = mates_run
    stage = join(run, "stages", "1")
    manifest = json.loads(store_for(stage).read_bytes("index", "streams.json"))
    assert manifest["method"] == "mates" and len(manifest["streams"]) == 4  # score buckets
    dataset = StreamingDataset(streams=[Stream(remote=s["remote"], local=str(tmp_path / s["name"]),
                                               proportion=s["proportion"]) for s in manifest["streams"]],
                               shuffle=False, batch_size=1)
    selection = read_parquet(stage, "selection.parquet")
    chosen = selection.filter(selection.column("selected"))
    assert sorted(int(dataset[i]["sample_id"]) for i in range(len(dataset))) == \
        sorted(chosen.column("sample_id").to_pylist())


# ---------------------------------------------------------------- mates query over s3://
def test_query_source_mix_over_s3(mates_run, s3_pool):
    run, _ = mates_run
    sql = ("SELECT stage, s.source, count(*) AS n FROM selection JOIN samples s USING (sample_id) "
           "WHERE selected GROUP BY ALL ORDER BY stage, source")
    result = mates("query", run, sql, "--csv", "-")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == '"stage","source","n"'
    got = {(int(s), src.strip('"')): int(n) for s, src, n in (line.split(",") for line in lines[1:])}
    catalog = read_catalog(s3_pool, ["source"])
    source = dict(zip(catalog.column("sample_id").to_pylist(), catalog.column("source").to_pylist()))
    for stage in (0, 1):
        sel = read_parquet(join(run, "stages", str(stage)), "selection.parquet")
        expected: dict = {}
        for sid, chosen in zip(sel.column("sample_id").to_pylist(), sel.column("selected").to_pylist()):
            if chosen:
                expected[(stage, source[sid])] = expected.get((stage, source[sid]), 0) + 1
        assert {k: v for k, v in got.items() if k[0] == stage} == expected
        # the audit view's selection shares are the same counts, as shares of the stage's selection
        audit = mates("query", run, f"SELECT \"group\", selected_share, probes FROM audit WHERE stage = {stage}",
                      "--csv", "-")
        assert audit.returncode == 0, audit.stderr
        rows = [line.split(",") for line in audit.stdout.strip().splitlines()[1:]]
        total = sum(v for k, v in expected.items())
        for group, share, probes in rows:
            assert float(share) == pytest.approx(expected.get((stage, group.strip('"')), 0) / total)
        assert sum(int(p) for _, _, p in rows) == (N_PROBES if stage == 1 else 0)  # stage 1's probes, by group
    assert "audit by source (oracle): prefers" in mates_run[1].stderr


def test_query_is_read_only(mates_run):
    run, _ = mates_run
    before = sorted(store_for(run).walk_files())
    for sql in ["COPY (SELECT 1 AS x) TO 'matesrun://evil.parquet'",
                "COPY (SELECT 1 AS x) TO 'matesdata://evil.parquet'",
                "COPY (SELECT 1 AS x) TO '/tmp/mates-evil.csv'",
                "SET disabled_filesystems = ''"]:
        result = mates("query", run, sql)
        assert result.returncode == 2 and "read-only" in result.stderr, (sql, result.stderr)
    assert sorted(store_for(run).walk_files()) == before


def test_query_hides_uncommitted_stage(tmp_path):
    import pyarrow as pa

    from schemas.storage import write_parquet

    run = str(tmp_path / "run")
    store_for(run).write_bytes(b"data: /nowhere\nrun: /nowhere\n", "recipe.yaml")
    table = pa.table({"sample_id": [1, 2], "bucket": ["b000", ""], "weight": [1.0, 0.0], "selected": [True, False]})
    write_parquet(table, run, "stages", "0", "selection.parquet")
    write_parquet(table, run, "stages", "1", "selection.parquet")
    store_for(run).write_bytes(b'{"stage": 0, "method": "random"}', "stages", "0", "_SUCCESS")
    result = mates("query", run, "SELECT stage, count(*) AS n FROM selection GROUP BY stage", "--csv", "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[1:] == ["0,2"]  # stage 1 has no _SUCCESS


# ---------------------------------------------------------------- group_mates end to end
# group_mates's numbers checked here are its trajectories, clusters and quotas, not the fit's quality:
# 24 probes (the influence model needs 10) and one epoch.
GROUP_OPTIONS = ("stages.options={n_probes: 24, probe_batch: 12, encoder_layers: 1, encoder_max_len: 64, "
                 "epochs: 1, max_target: 16, n_trajectories: 12, trajectory_length: 4, "
                 "relational_epochs: 50, n_clusters: 4}")


@pytest.fixture(scope="module")
def group_run(s3_pool, s3_server):
    return method_run(s3_server, s3_pool, "group_mates", GROUP_OPTIONS)


def test_group_mates_writes_trajectories_clusters_and_reweighted_streams(group_run, tmp_path):
    from streaming import Stream, StreamingDataset

    run, result = group_run
    stage = join(run, "stages", "1")
    traj = read_parquet(stage, "trajectories.parquet")
    assert traj.num_rows == 12 * 4 and sorted(set(traj.column("step").to_pylist())) == [1, 2, 3, 4]
    assert store_for(stage).exists("relational_model", "relational_model.json")
    scores = read_parquet(stage, "scores", "part-00000.parquet")
    assert set(scores.column("cluster").to_pylist()) == {0, 1, 2, 3}
    manifest = json.loads(store_for(stage).read_bytes("index", "streams.json"))
    assert manifest["method"] == "group_mates"
    assert {s["name"] for s in manifest["streams"]} <= {"c000", "c001", "c002", "c003"}
    assert abs(sum(s["proportion"] for s in manifest["streams"]) - 1) < 1e-9
    selection = read_parquet(stage, "selection.parquet")
    chosen = selection.filter(selection.column("selected"))
    assert chosen.num_rows == 200  # the quotas sum to the stage budget
    for s in manifest["streams"]:  # each bucket's proportion is its quota's share of the budget
        assert abs(s["proportion"] - s["samples"] / 200) < 1e-9
    dataset = StreamingDataset(streams=[Stream(remote=s["remote"], local=str(tmp_path / s["name"]),
                                               proportion=s["proportion"]) for s in manifest["streams"]],
                               shuffle=False, batch_size=1)
    assert sorted(int(dataset[i]["sample_id"]) for i in range(len(dataset))) == \
        sorted(chosen.column("sample_id").to_pylist())
    assert "relational model: held-out Spearman" in result.stderr
    from curation.compute import trajectory_flops

    marker = json.loads(store_for(stage).read_bytes("_SUCCESS"))
    lm, phases = assert_ledger(run, marker)
    steps, tokens = marker["curation/ledger/trajectory_steps"], marker["curation/ledger/trajectory_tokens"]
    assert steps == 12 * 4 and phases["group_oracle"] == trajectory_flops(
        lm, steps=steps, batch_tokens=tokens / steps, reference_tokens=marker["curation/ledger/trajectory_reference_tokens"])


def test_query_group_views_over_s3(group_run):
    run, _ = group_run
    result = mates("query", run, "SELECT count(*) AS n FROM trajectories", "--csv", "-")
    assert result.returncode == 0 and result.stdout.strip().splitlines()[1] == "48", result.stderr


def test_report_of_runs_over_s3_plots_influence_and_clusters(mates_run, group_run, tmp_path):
    """`mates report RUN` on s3:// runs: the influence scatter (mates) and clusters (group_mates)."""
    from tests.test_compare_report import _assert_valid_pngs

    from training.report_plots import cumulative_compute
    from training.report_runs import load_run

    for (run, _), expected in ((mates_run, ["loss.png", "sources.png", "audit.png", "influence.png", "costs.png",
                                            "compute.png"]),
                               (group_run, ["loss.png", "sources.png", "audit.png", "influence.png", "clusters.png",
                                            "costs.png", "compute.png"])):
        out = tmp_path / run.split("/")[2]
        result = mates("report", run, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        assert _assert_valid_pngs(str(out / "index.html")) == expected
        # the compute plot's x: every stage's training FLOPs plus every boundary's curation FLOPs so far
        flops, seconds, stages = cumulative_compute(load_run(run))
        rows = {r["stage"]: r for r in read_parquet(run, "metrics.parquet").to_pylist()}
        curation = [json.loads(store_for(join(run, "stages", str(k))).read_bytes("_SUCCESS"))["curation_flops"]
                    for k in stages]
        assert list(stages) == [0, 1] and curation[1] > 0
        np.testing.assert_allclose(flops, np.cumsum([rows[k]["train_flops"] + c for k, c in zip(stages, curation)]))
        assert np.all(np.diff(seconds) > 0)


def test_mates_oracle_backbone_scores_every_candidate_with_the_oracle(s3_pool, s3_server):
    """`backbone: oracle` (the entry mates@oracle): no influence model; every candidate is probed
    (forward, dealt like any probes) and its influence is its prediction: the upper bound a model
    could reach, with its cost in the ledger's probe phase."""
    run, _ = method_run(s3_server, s3_pool, "mates", "stages.options={backbone: oracle, probe_method: forward, "
                        "n_probes: 8, probe_batch: 50, max_target: 16}", prefix="mates-oracle")
    stage = join(run, "stages", "1")
    probes = read_parquet(stage, "probes.parquet")
    scores = read_parquet(stage, "scores", "part-00000.parquet")
    assert probes.num_rows == scores.num_rows == 400  # every candidate, not n_probes
    np.testing.assert_array_equal(probes.column("sample_id"), scores.column("sample_id"))
    np.testing.assert_allclose(np.asarray(scores.column("prediction")), np.asarray(probes.column("influence")),
                               rtol=1e-6)   # predictions are stored as float32
    assert not store_for(stage).exists("influence_model") and not store_for(stage).exists("frozen_head")
    marker = json.loads(store_for(stage).read_bytes("_SUCCESS"))
    _, phases = assert_ledger(run, marker)
    assert phases.get("score", 0.0) == 0.0 and phases.get("fit", 0.0) == 0.0 and phases["probe"] > 0


def test_mates_ngram_backbone_fits_the_head_on_hashed_ngrams(s3_pool, s3_server):
    """`backbone: ngram` (mates@ngram): the frozen head fitted on the probes' hashed word n-gram
    features; every rank's predictions are that head over the candidates' features; no encoder."""
    from curation.data.tokenizer import load_pool_tokenizer
    from curation.influence.frozen_head import FrozenHead
    from curation.influence.hashed_ngrams import ngram_features
    from curation.influence.scoring import pool_texts
    from curation.store.pool import MDSFolder

    run, result = method_run(s3_server, s3_pool, "mates", "stages.options={backbone: ngram, ngram_features: 256, "
                             "probe_method: forward, n_probes: 64, probe_batch: 32, max_target: 16}",
                             prefix="mates-ngram")
    stage = join(run, "stages", "1")
    head = FrozenHead.load(join(stage, "ngram_head"))
    assert head.dim == 256 and head.embeddings_key == "ngram-256"
    scores = read_parquet(stage, "scores", "part-00000.parquet")
    ids = np.asarray(scores.column("sample_id"))
    texts = pool_texts(MDSFolder(join(s3_pool, "pool")), ids, load_pool_tokenizer(s3_pool))
    np.testing.assert_allclose(np.asarray(scores.column("prediction")), head.predict(ngram_features(texts, 256)),
                               rtol=1e-5, atol=1e-6)
    marker = json.loads(store_for(stage).read_bytes("_SUCCESS"))
    assert marker["curation/influence/backbone"] == "ngram" and -1 <= marker["curation/influence/val_spearman"] <= 1
    assert -1 <= marker["curation/influence/cv_spearman"] <= 1   # 64 probes: 5 folds of the head, no encoder
    assert marker["flops_fit"] == marker["flops_score"] == 0.0 and marker["flops_probe"] > 0
    assert "n-gram head: held-out Spearman" in result.stderr + result.stdout
