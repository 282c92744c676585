"""The baselines, `mates compare` and `mates report` on the micro pool (local folder)."""
import json
import os
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from curation.methods.dsir_method import log_importance_weights
from curation.store.catalog import read_catalog
from training.compare_tables import tokens_to_reach
from tests.conftest import MICRO_RECIPE, mates

pytestmark = pytest.mark.slow
METHODS = "random,dsir,classifier,perplexity"


# ---------------------------------------------------------------- units
def test_dsir_log_weights_match_the_formula():
    """log w(x) = sum over x's hashed n-grams of log p_target - log p_raw, add-one smoothed."""
    target, raw, F = ["the cat sat", "the cat ran"], ["the cat sat", "dogs bark loudly", "the"], 1 << 20

    def ids(text):
        w = text.split()
        grams = w + [" ".join(w[i:i + 2]) for i in range(len(w) - 1)]
        return [zlib.crc32(g.encode()) % F for g in grams]

    def log_p(texts):
        counts = np.ones(F)
        for t in texts:
            np.add.at(counts, ids(t), 1)
        return np.log(counts / counts.sum())

    ratio = log_p(target) - log_p(raw)
    expected = [ratio[ids(t)].sum() for t in raw]
    got = log_importance_weights(raw, target, F, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] > 0 > got[1]  # the target's own text is up-weighted, unrelated text down


def test_perplexity_sample_losses_equal_the_models_own_loss(local_pool):
    from curation.data.tokenizer import EOS, load_pool_tokenizer
    from curation.lm.model import build_causal_lm
    from curation.methods.perplexity_method import sample_losses
    from curation.store.pool import MDSFolder
    from schemas.recipe import load_recipe

    tok = load_pool_tokenizer(local_pool)
    model = build_causal_lm(load_recipe(MICRO_RECIPE).model, tok.get_vocab_size(), tok.token_to_id(EOS), seed=0).eval()
    pool = MDSFolder(os.path.join(local_pool, "pool"))
    ids = np.arange(0, 40, 3)
    got = sample_losses(model, pool, ids, tok.token_to_id(EOS), batch_size=5, device="cpu")
    with torch.no_grad():
        expected = [float(model(input_ids=torch.as_tensor(pool[int(i)]["tokens"].astype(np.int64))[None],
                                labels=torch.as_tensor(pool[int(i)]["tokens"].astype(np.int64))[None]).loss)
                    for i in ids]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.std(got) > 0


def test_tokens_to_reach_interpolates_between_evaluations():
    tokens, losses = [0, 100, 200, 300], [8.0, 6.0, 5.0, 4.0]
    assert tokens_to_reach(tokens, losses, 5.5) == pytest.approx(150.0)
    assert tokens_to_reach(tokens, losses, 4.0) == pytest.approx(300.0)
    assert tokens_to_reach(tokens, losses, 3.9) is None


# ---------------------------------------------------------------- compare + report
@pytest.fixture(scope="module")
def comparison(local_pool, tmp_path_factory):
    """Ten runs (2 warm-ups, 4 methods x 2 seeds), each its own process: short stages (8 + 4 batches)
    since what is compared here is the bookkeeping, not how far the micro model gets."""
    out = str(tmp_path_factory.mktemp("compare"))
    args = ["compare", MICRO_RECIPE, "--methods", METHODS, "--seeds", "2", "--jobs", "2", "--out", out,
            "--set", f"data={local_pool}", "--set", "stages.pool_per_stage=300", "--set", "stages.batches=[8, 4]"]
    result = mates(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, args, result


def _sources(local_pool, ids):
    catalog = read_catalog(local_pool, ["source"]).to_pydict()
    source = dict(zip(catalog["sample_id"], catalog["source"]))
    return [source[i] for i in ids]


def test_compare_table_and_shared_warmup(comparison, local_pool):
    out, _, result = comparison
    runs = pq.read_table(os.path.join(out, "runs.parquet")).to_pylist()
    sets = ("wiki_en", "wiki_en_cloze", "bbc_en")
    assert sorted((r["method"], r["seed"], r["eval_set"]) for r in runs) == \
        sorted((m, s, e) for m in METHODS.split(",") for s in (17, 18) for e in sets)
    assert {r["eval_set"] for r in runs if r["primary"]} == {"wiki_en"}  # the micro recipe's eval.primary
    table = open(os.path.join(out, "comparison.md")).read()
    for method in METHODS.split(","):
        assert f"| {method} | 2 | " in table
    assert "| wiki_en (primary) | vs random | wiki_en_cloze | bbc_en |" in table
    assert "| random | 2 | " in result.stdout and "mates compare" in table
    for seed in (17, 18):
        warm = os.path.join(out, "runs", f"seed-{seed}", "warmup")
        warm_sel = pq.read_table(os.path.join(warm, "stages", "0", "selection.parquet"))
        warm_metrics = pq.read_table(os.path.join(warm, "metrics.parquet")).to_pylist()
        finals = []
        for method in METHODS.split(","):
            run = os.path.join(out, "runs", f"seed-{seed}", method)
            # every method starts from the same stage 0: same selection, same model metrics
            assert pq.read_table(os.path.join(run, "stages", "0", "selection.parquet")).equals(warm_sel)
            metrics = pq.read_table(os.path.join(run, "metrics.parquet")).to_pylist()
            assert metrics[:6] == warm_metrics and [m["stage"] for m in metrics] == [-1] * 3 + [0] * 3 + [1] * 3
            manifest = json.load(open(os.path.join(run, "stages", "0", "index", "streams.json")))
            assert all(s["remote"].startswith(run) for s in manifest["streams"])  # not the warm-up's
            finals.append(next(m["loss"] for m in metrics if m["stage"] == 1 and m["eval_set"] == "wiki_en"))
        assert len(set(np.round(finals, 6))) == len(finals)  # stage 1 differs by method
    assert len({r["final_loss"] for r in runs if r["method"] == "random" and r["primary"]}) == 2  # seeds differ
    for r in runs:  # tokens counted from the first boundary: the shared warm-up is not counted
        assert 0 < r["curated_tokens"] < r["tokens_seen"]
        # compute counted the same way: one curated stage, its training FLOPs + its boundary's curation
        stage = os.path.join(r["run"], "stages", "1")
        marker = json.load(open(os.path.join(stage, "_SUCCESS")))
        trained = [m for m in pq.read_table(os.path.join(r["run"], "metrics.parquet")).to_pylist() if m["stage"] == 1]
        assert r["curated_flops"] == pytest.approx(trained[0]["train_flops"] + marker["curation_flops"])
        assert r["curated_seconds"] == pytest.approx(trained[0]["train_seconds"] + marker["curation_seconds"])
        if r["curated_tokens_to_random_final"] is not None and r["method"] == "random":
            assert 0 < r["curated_flops_to_random_final"] <= r["curated_flops"] * (1 + 1e-9)
    assert "curated compute to random's final loss (FLOPs; seconds)" in table


def test_text_baselines_move_the_mix_toward_the_target(comparison, local_pool):
    """dsir and classifier aim at the (English Wikipedia) target: more wiki_en than the pool."""
    out, _, _ = comparison
    for method in ("dsir", "classifier"):
        sel = pq.read_table(os.path.join(out, "runs", "seed-17", method, "stages", "1", "selection.parquet")).to_pydict()
        chosen = [i for i, k in zip(sel["sample_id"], sel["selected"]) if k]
        pool_share = _sources(local_pool, sel["sample_id"]).count("wiki_en") / len(sel["sample_id"])
        share = _sources(local_pool, chosen).count("wiki_en") / len(chosen)
        assert share > pool_share + 0.05, (method, share, pool_share)


def test_compare_again_runs_nothing(comparison):
    out, args, _ = comparison
    marker = os.path.join(out, "runs", "seed-17", "dsir", "stages", "1", "_SUCCESS")
    before = os.stat(marker).st_mtime_ns
    table = open(os.path.join(out, "comparison.md")).read()
    result = mates(*args)
    assert result.returncode == 0 and "compare: [" not in result.stderr
    assert os.stat(marker).st_mtime_ns == before
    # --table-only with one more entry: trains nothing, the table holds the finished runs only
    result = mates(*[a if a != METHODS else METHODS + ",mates@frozen" for a in args], "--table-only")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "runs", "seed-17", "mates@frozen"))
    rows = lambda text: [line for line in text.splitlines() if line.startswith(("|", "- "))]  # noqa: E731
    assert rows(open(os.path.join(out, "comparison.md")).read()) == rows(table) and "| mates@frozen |" not in table
    stages = pq.read_table(os.path.join(out, "stages.parquet")).to_pylist()
    assert sorted((r["method"], r["seed"]) for r in stages) == sorted(
        (m, s) for m in METHODS.split(",") for s in (17, 18))
    assert all(r["stage"] == 1 and r["curation_seconds"] > 0 and r["train_seconds"] > 0 for r in stages)
    assert all((r["influence_spearman"] is not None) == r["method"].startswith("mates") for r in stages)
    audits = pq.read_table(os.path.join(out, "audits.parquet")).to_pylist()
    assert {(r["method"], r["seed"]) for r in audits} == {(r["method"], r["seed"]) for r in stages}


def _assert_valid_pngs(page: str) -> list[str]:
    import re

    import matplotlib.image

    html = open(page, encoding="utf-8").read()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images and "http" not in "".join(images)
    for name in images:
        path = os.path.join(os.path.dirname(page), name)
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0
    return images


def test_report_of_a_comparison(comparison, tmp_path):
    out, _, _ = comparison
    result = mates("report", out, "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    images = _assert_valid_pngs(str(tmp_path / "report" / "index.html"))
    # no probes, no clusters among these; compute: loss against training + curation FLOPs and seconds
    assert images == ["loss.png", "sources.png", "audit.png", "costs.png", "compute.png"]
    assert "<table>" in open(tmp_path / "report" / "index.html").read()


def test_report_of_a_comparison_whose_run_folders_are_gone(comparison, tmp_path):
    """A committed comparison (its tables, not its runs): a run whose folder is gone is rebuilt
    from the tables (losses, curation seconds and FLOPs per stage, the audit's source mix), equal
    to what its folder gave; the report still draws every entry's loss and says what is missing."""
    import shutil

    import pyarrow as pa

    from training.report import write_report
    from training.report_runs import comparison_rows, load_run, view_from_tables

    out, _, _ = comparison
    kept = tmp_path / "committed"
    kept.mkdir()
    for name in ("comparison.json", "comparison.md", "metrics.parquet", "stages.parquet", "audits.parquet"):
        shutil.copy(os.path.join(out, name), kept / name)
    runs = pq.read_table(os.path.join(out, "runs.parquet"))
    gone = next(r for r in runs.to_pylist() if r["method"] == "dsir")
    paths = [str(tmp_path / "gone") if r == gone["run"] else r for r in runs.column("run").to_pylist()]
    pq.write_table(runs.set_column(runs.schema.get_field_index("run"), "run", pa.array(paths)), kept / "runs.parquet")

    folder, rebuilt = load_run(gone["run"]), view_from_tables(comparison_rows(str(kept)), "dsir", gone["seed"], data="")
    assert rebuilt.from_tables and [m["loss"] for m in rebuilt.metrics] == [m["loss"] for m in folder.metrics]
    assert sorted(rebuilt.stages) == sorted(k for k in folder.stages if k >= 1)
    for k, st in rebuilt.stages.items():
        marker = folder.stages[k]["marker"]
        assert st["marker"] == {"curation_seconds": pytest.approx(marker["curation_seconds"]),
                                "curation_flops": pytest.approx(marker["curation_flops"])}
        assert [a["selected_share"] for a in st["audit"]] == [a["selected_share"] for a in folder.stages[k]["audit"]]
    page = write_report(str(kept), str(tmp_path / "report"), log=lambda *_: None)
    assert "1 run(s) have no folder here" in open(page).read()
    assert "loss.png" in _assert_valid_pngs(page) and "compute.png" in _assert_valid_pngs(page)


def test_compare_refuses_bad_arguments_before_any_work(local_pool, tmp_path):
    result = mates("compare", MICRO_RECIPE, "--methods", "random,nope", "--out", str(tmp_path / "c"),
                   "--set", f"data={local_pool}")
    assert result.returncode == 2 and "`--methods`" in result.stderr and "nope" in result.stderr
    result = mates("compare", MICRO_RECIPE, "--methods", "random,dsir", "--out", str(tmp_path / "c"),
                   "--set", f"data={local_pool}", "--set", "stages.options.dsir.n_features=0")
    assert result.returncode == 2 and "stages.options.dsir.n_features" in result.stderr
    assert not os.path.exists(tmp_path / "c" / "runs")


def test_backbone_entries_are_runs_of_their_own(local_pool, tmp_path):
    """`mates@frozen` is an entry beside `mates`: same method, the other backbone, its own folder."""
    from training.compare import WARMUP, parse_methods, plan

    entries = parse_methods("random,mates,mates@frozen,group_mates@frozen,mates@oracle,mates@ngram,"
                            "group_mates@frozen-no-interaction")
    specs = plan(MICRO_RECIPE, {"data": local_pool}, entries, 1, str(tmp_path))
    by = {s.method: s.recipe for s in specs if s.method != WARMUP}
    assert by["mates"].stages.method == by["mates@frozen"].stages.method == "mates"
    assert (by["mates"].method_options.backbone, by["mates@frozen"].method_options.backbone) == ("finetune", "frozen")
    assert by["group_mates@frozen"].method_options.backbone == "frozen"
    assert by["mates@frozen"].run.endswith(os.path.join("seed-17", "mates@frozen"))
    assert (by["mates@oracle"].method_options.backbone, by["mates@ngram"].method_options.backbone) == \
        ("oracle", "ngram")
    off = by["group_mates@frozen-no-interaction"]   # the same entry, the greedy's relational term off
    assert (off.method_options.backbone, off.method_options.interaction) == ("frozen", False)
    assert by["group_mates@frozen"].method_options.interaction is True
    # each frozen run pays for its own embeddings: a store shared over the pool charged them to the first run
    assert by["mates@frozen"].method_options.embeddings_url == os.path.join(by["mates@frozen"].run, "embeddings")
    assert by["mates"].method_options.embeddings_url is None
    for bad in ("dsir@frozen", "mates@tiny", "group_mates@oracle", "group_mates@ngram", "mates-no-interaction"):
        with pytest.raises(Exception, match="--methods"):
            parse_methods(bad)
