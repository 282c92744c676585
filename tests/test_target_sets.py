"""Targets and eval sets: disjoint by construction, refused when they overlap, both loss kinds
computed as defined, and curation that reads only the target its recipe names."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from curation.lm.batching import ReferenceSet
from curation.data.sets import EVAL, TARGETS, example_text, load_set, normalised_sha1
from curation.data.tokenizer import EOS, load_pool_tokenizer
from jobs.cli import main
from schemas.storage import read_parquet
from tests.conftest import MICRO_RECIPE


def cli(capsys, *args: str) -> tuple[int, str]:
    """The `mates` CLI in this process (no interpreter start-up per call): (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_demo_pool_targets_and_eval_sets_share_no_document(micro_corpus):
    """No document (normalised-text sha1) is in two of {pool, every target, every eval set}; cloze
    contexts are not even substrings of another set's text."""
    groups = {"pool": [d["text"] for d in _rows(os.path.join(micro_corpus, "corpus.jsonl"))]}
    for role in (TARGETS, EVAL):
        for path in sorted(glob.glob(os.path.join(micro_corpus, role, "*.jsonl"))):
            groups[f"{role}/{os.path.basename(path)}"] = [example_text(r) for r in _rows(path)]
    assert set(groups) == {"pool", "targets/wiki_en.jsonl", "targets/wiki_en_cloze.jsonl", "eval/wiki_en.jsonl",
                           "eval/wiki_en_cloze.jsonl", "eval/bbc_en.jsonl"}
    hashes = {name: {normalised_sha1(t) for t in texts} for name, texts in groups.items()}
    for name, texts in groups.items():  # the sets are de-duplicated (the pool keeps its junk tiers' repeats)
        assert len(texts) >= 50 and (name == "pool" or len(hashes[name]) == len(texts)), name
    names = sorted(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not hashes[a] & hashes[b], (a, b)
    others = " ".join(t for name, texts in groups.items() if "cloze" not in name for t in texts)
    for name in ("targets/wiki_en_cloze.jsonl", "eval/wiki_en_cloze.jsonl"):
        contexts = [r["context"] for r in _rows(os.path.join(micro_corpus, *name.split("/")))]
        assert not any(c in others for c in contexts[:40]), name


def test_ingest_refuses_an_eval_set_that_overlaps_the_pool_or_a_target(micro_corpus, tmp_path, capsys):
    """One line naming the eval set and what it overlaps; nothing is written to <data>."""
    doc = _rows(os.path.join(micro_corpus, "corpus.jsonl"))[5]["text"]
    target = _rows(os.path.join(micro_corpus, "targets", "wiki_en.jsonl"))[3]["text"]
    cases = {"pool": "  " + doc.upper().replace(" ", "\n  ") + " ",  # case and whitespace do not hide it
             "target `wiki_en`": target}
    for overlaps, text in cases.items():
        leak = tmp_path / f"leak-{len(overlaps)}.jsonl"
        leak.write_text(json.dumps({"text": "A fresh sentence of its own."}) + "\n" + json.dumps({"text": text}) + "\n")
        data = tmp_path / f"data-{len(overlaps)}"
        code, err = cli(capsys, "ingest", "--input", os.path.join(micro_corpus, "corpus.jsonl"), "--data", str(data),
                        "--vocab-size", "512", "--seq-len", "64",
                        "--target", f"wiki_en={os.path.join(micro_corpus, 'targets', 'wiki_en.jsonl')}",
                        "--eval", f"leak={leak}")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err[-2000:]
        assert "eval set `leak`" in lines[0] and overlaps in lines[0], lines[0]
        assert not data.exists() or not any(data.rglob("*")), list(data.rglob("*"))


def test_pool_stamps_each_set_with_its_loss_kind(local_pool):
    marker = json.load(open(os.path.join(local_pool, "_SUCCESS")))
    assert {n: e["kind"] for n, e in marker["sets"][TARGETS].items()} == {"wiki_en": "lm", "wiki_en_cloze": "cloze"}
    assert {n: e["kind"] for n, e in marker["sets"][EVAL].items()} == \
        {"wiki_en": "lm", "wiki_en_cloze": "cloze", "bbc_en": "lm"}
    tok = load_pool_tokenizer(local_pool)
    lm = read_parquet(local_pool, TARGETS, "wiki_en.parquet").to_pylist()
    assert all(r["target_start"] == 1 and r["input_ids"][0] == tok.token_to_id(EOS) for r in lm)
    cloze = read_parquet(local_pool, EVAL, "wiki_en_cloze.parquet").to_pylist()
    assert all(1 < r["target_start"] < len(r["input_ids"]) <= 64 for r in cloze)
    word = tok.decode(cloze[0]["input_ids"][cloze[0]["target_start"]:])
    assert word.strip() and " " not in word.strip()  # the target is one word


def _direct_mean_loss(model, rows: list[dict]) -> float:
    """Sum of -log p(token_t | tokens_<t) over t >= target_start, one unpadded example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor(r["input_ids"])[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)   # [L, V]
            for t in range(max(r["target_start"], 1), ids.shape[1]):
                total -= float(logp[t - 1, ids[0, t]])
                count += 1
    return total / count


@pytest.mark.parametrize("name", ["wiki_en", "wiki_en_cloze"])
def test_both_loss_kinds_equal_a_direct_computation(local_pool, name):
    """lm counts every token after the leading <eos>, cloze only the target word; the oracle's L_ref
    (OracleProber.base_loss on the target) and the stage loop's evaluation (on the eval set) agree."""
    from jobs.bench_probe import toy_probe_state
    from curation.oracle.probes import OracleProber, model_from_state
    from schemas.recipe import load_recipe
    from training.evaluation import evaluate, load_eval_sets

    tok = load_pool_tokenizer(local_pool)
    state = toy_probe_state(load_recipe(MICRO_RECIPE).model, tok.get_vocab_size())
    model = model_from_state(state, "cpu").eval()
    pad = tok.token_to_id(EOS)
    target_rows = load_set(local_pool, TARGETS, name).to_pylist()[:24]
    prober = OracleProber(state, ReferenceSet(load_set(local_pool, TARGETS, name), pad, 7, limit=24))
    assert prober.base_loss() == pytest.approx(_direct_mean_loss(model, target_rows), rel=2e-5)

    marker = json.load(open(os.path.join(local_pool, "_SUCCESS")))
    got = {r["eval_set"]: r for r in evaluate(model, load_eval_sets(local_pool, marker, pad_id=pad,
                                                                    batch_size=5, max_examples=24))}
    eval_rows = load_set(local_pool, EVAL, name).to_pylist()[:24]
    assert got[name]["loss_kind"] == ("cloze" if "cloze" in name else "lm")
    assert got[name]["loss"] == pytest.approx(_direct_mean_loss(model, eval_rows), rel=2e-5)
    assert got[name]["perplexity"] == pytest.approx(np.exp(got[name]["loss"]))
    counted = sum(len(r["input_ids"]) - r["target_start"] for r in eval_rows)
    if name == "wiki_en":  # every token but the leading <eos>
        assert counted == sum(len(r["input_ids"]) - 1 for r in eval_rows)
    else:  # a handful of target-word tokens per example
        assert counted <= 4 * len(eval_rows)


METHOD_BLOCKS = ("stages.options={"
                 "mates: {target: wiki_en_cloze, n_probes: 24, probe_batch: 12, probe_method: first_order, "
                 "encoder_layers: 1, encoder_max_len: 32, epochs: 1, max_target: 16, batch_size: 12}, "
                 "group_mates: {target: wiki_en_cloze, n_probes: 24, probe_batch: 12, probe_method: first_order, "
                 "encoder_layers: 1, encoder_max_len: 32, epochs: 1, max_target: 16, batch_size: 12, "
                 "n_trajectories: 10, trajectory_length: 3, relational_epochs: 20, n_clusters: 3}, "
                 "dsir: {target: wiki_en_cloze, max_target: 16}, classifier: {target: wiki_en_cloze, "
                 "max_target: 16, epochs: 1}}")


@pytest.mark.slow
def test_curation_reads_the_named_target_and_never_an_eval_set(local_pool, tmp_path, capsys):
    """With every eval set and the default target overwritten by garbage, each targeted method still
    curates stage 1 (from `mates curate`) and stamps the target it aimed at."""
    data = str(tmp_path / "data")
    shutil.copytree(local_pool, data)
    run = str(tmp_path / "warm")
    code, err = cli(capsys, "run", MICRO_RECIPE, "--set", f"data={data}", "--set", f"run={run}", "--set", METHOD_BLOCKS,
                    "--set", "stages.pool_per_stage=200", "--set", "stages.batches=[12, 4]", "--until-stage", "0")
    assert code == 0, err[-3000:]
    out = tmp_path / "oracle-audit.json"
    code, err = cli(capsys, "audit-oracle", "--run", run, "--targets", "wiki_en,wiki_en_cloze",
                    "--methods", "forward=4,first_order=4,exact=2", "--max-target", "8", "--out", str(out))
    assert code == 0, err[-3000:]
    result = json.load(open(out))
    for target in ("wiki_en", "wiki_en_cloze"):  # 8 sources x (4 forward, 4 first-order, 2 exact) probes, shared
        rows = [r for r in result["rows"] if r["target"] == target]
        assert sorted((r["method"], r["probes"]) for r in rows) == \
            [("exact", 2)] * 8 + [("first_order", 4)] * 8 + [("forward", 4)] * 8
        pairs = {(a["a"], a["b"]): a for a in result["spearman"] if a["target"] == target}
        share = pairs[("first_order", "exact")]
        assert share["probes"] == 16 and share["spearman"] > 0.5  # first order ranks like exact
        assert pairs[("forward", "first_order")]["probes"] == 32
        assert pairs[("forward", "first_order")]["spearman"] > 0.8
        assert -1 <= pairs[("forward", "first_order")]["group_spearman"] <= 1
    for path in glob.glob(os.path.join(data, EVAL, "*.parquet")) + [os.path.join(data, TARGETS, "wiki_en.parquet")]:
        with open(path, "wb") as handle:
            handle.write(b"not parquet")
    for method in ("dsir", "classifier", "mates", "group_mates"):
        forked = str(tmp_path / method)
        shutil.copytree(run, forked)
        recipe = yaml.safe_load(open(os.path.join(forked, "recipe.yaml")))
        recipe["stages"]["method"] = method
        recipe["run"] = forked
        yaml.safe_dump(recipe, open(os.path.join(forked, "recipe.yaml"), "w"), sort_keys=False)
        code, err = cli(capsys, "curate", "--run", forked, "--stage", "1")
        assert code == 0, (method, err[-3000:])
        marker = json.load(open(os.path.join(forked, "stages", "1", "_SUCCESS")))
        assert marker["method"] == method and marker["target"] == "wiki_en_cloze"
        audit = read_parquet(os.path.join(forked, "stages", "1"), "audit.parquet").to_pylist()
        assert {a["group"] for a in audit} <= {"wiki_en", "wiki_es", "wiki_fr", "bbc_news", "shuffled", "spam",
                                               "char_noise", "near_dup"}
        assert sum(a["candidates"] for a in audit) == 200
        assert sum(a["selected_share"] for a in audit) == pytest.approx(1.0)
        if method in ("mates", "group_mates"):
            assert sum(a["probes"] for a in audit) == 24 and "audit by source (oracle)" in err


def test_an_unknown_target_or_primary_eval_is_refused_before_any_work(local_pool, tmp_path, capsys):
    for key, value, said in (("stages.options", "{target: nope}", "`stages.options.target` must be one of wiki_en, "
                                                                   "wiki_en_cloze"),
                             ("eval.primary", "nope", "`eval.primary` must be one of wiki_en, wiki_en_cloze, bbc_en"),
                             ("stages.audit_by", "nope", "`stages.audit_by` must be a catalog column")):
        run = tmp_path / key
        code, err = cli(capsys, "run", MICRO_RECIPE, "--set", f"data={local_pool}", "--set", f"run={run}",
                        "--set", "stages.method=dsir", "--set", f"{key}={value}")
        assert code == 2 and said in err, err[-2000:]
        assert not (run / "stages").exists()


def test_audit_table_aggregates_by_group_as_numpy_does():
    """Mean z and standard error per group, the selection share, and the oracle side where probed."""
    import pyarrow as pa

    from curation.oracle.stage_audit import audit_line, audit_table, zscore

    rng = np.random.default_rng(3)
    groups = np.array(["a", "b", "c"])[rng.integers(0, 3, 300)]
    catalog = pa.table({"sample_id": np.arange(300), "source": groups})
    cand = np.sort(rng.choice(300, 120, replace=False))
    scores = rng.normal(size=120) + (groups[cand] == "a") * -1.0    # "a" is preferred
    selected = scores < np.quantile(scores, 0.25)
    probes = cand[::3]
    influence = rng.normal(size=len(probes)) + (groups[probes] == "c") * 2.0   # the oracle hates "c"
    got = {r["group"]: r for r in audit_table(catalog, stage=2, group_by="source", candidates=cand, scores=scores,
                                              selected=selected, probe_ids=probes,
                                              probe_influence=influence).to_pylist()}
    z, oz = zscore(scores), zscore(influence)
    for g in "abc":
        mine = groups[cand] == g
        assert got[g]["candidates"] == mine.sum() and got[g]["stage"] == 2
        assert got[g]["score_mean_z"] == pytest.approx(z[mine].mean())
        assert got[g]["score_se"] == pytest.approx(z[mine].std(ddof=1) / np.sqrt(mine.sum()))
        assert got[g]["selected_share"] == pytest.approx((selected & mine).sum() / selected.sum())
        pm = groups[probes] == g
        assert got[g]["probes"] == pm.sum() and got[g]["oracle_mean_z"] == pytest.approx(oz[pm].mean())
    line = audit_line(audit_table(catalog, stage=2, group_by="source", candidates=cand, scores=scores,
                                  selected=selected, probe_ids=probes, probe_influence=influence))
    assert line.startswith("audit by source (oracle): prefers ") and "avoids c (" in line
    flat = audit_table(catalog, stage=0, group_by="source", candidates=cand, scores=np.zeros(120), selected=selected)
    assert audit_line(flat) is None and set(flat.column("probes").to_pylist()) == {0}  # random prefers nothing
