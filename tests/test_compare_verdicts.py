"""The comparison's summary and verdicts on hand-made runs and stage tables (no training)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from schemas import tables
from training.compare_tables import markdown_table, summarize, verdicts

# final losses per (method, seed) on the primary (wiki_en) and the off-target (bbc_en) set
FINALS = {
    "random": [(6.00, 6.30), (6.02, 6.31), (6.04, 6.29)],        # primary mean 6.02, std 0.02
    "dsir": [(5.90, 6.40), (5.92, 6.41), (5.91, 6.42)],          # best static: mean 5.91, std 0.01
    "classifier": [(5.95, 6.35), (5.96, 6.36), (5.97, 6.37)],
    "mates": [(5.915, 6.33), (5.925, 6.34), (5.920, 6.32)],      # 5.92 <= 5.91 + 0.01; bbc 6.33 < 6.41
    "group_mates": [(5.99, 6.30), (6.00, 6.30), (6.01, 6.30)],   # gains 0.02 < 2 x 0.02: missed
}


def _runs() -> pa.Table:
    rows = []
    for method, finals in FINALS.items():
        for seed, (primary, bbc) in enumerate(finals, start=17):
            for eval_set, loss in (("wiki_en", primary), ("bbc_en", bbc)):
                rows.append({"method": method, "seed": seed, "run": f"/r/{method}/{seed}", "eval_set": eval_set,
                             "primary": eval_set == "wiki_en", "final_loss": loss, "tokens_seen": 1000,
                             "tokens_to_random_final": None, "curated_tokens": 400,
                             "curated_tokens_to_random_final": 150.0 if method == "mates" else None,
                             "curation_seconds": 99.0, "train_seconds": 999.0})
    return pa.Table.from_pylist(rows, schema=tables.COMPARISON_RUNS)


def _without(runs: pa.Table, method: str, seeds) -> pa.Table:
    """`runs` less `method`'s rows of `seeds` (as if those runs had not finished)."""
    return pa.Table.from_pylist([r for r in runs.to_pylist() if not (r["method"] == method and r["seed"] in seeds)],
                                schema=runs.schema)


def _stages() -> pa.Table:
    rows = []
    for seed in (17, 18, 19):
        for stage, spearman in ((1, 0.62), (2, 0.48 if seed == 18 else 0.55), (3, 0.7)):
            rows.append({"method": "mates", "seed": seed, "stage": stage, "target": "wiki_en",
                         "influence_spearman": spearman, "relational_spearman": None,
                         "curation_seconds": 30.0, "train_seconds": 60.0, "curation_share_of_training": 0.5})
    rows.append({"method": "random", "seed": 17, "stage": 1, "target": None, "influence_spearman": None,
                 "relational_spearman": None, "curation_seconds": 1.0, "train_seconds": 50.0,
                 "curation_share_of_training": 0.02})
    return tables.conform(pa.Table.from_pylist(rows, schema=tables.COMPARISON_STAGES), tables.COMPARISON_STAGES)


def test_verdicts_say_each_target_met_or_missed_with_its_numbers():
    summary = summarize(_runs(), list(FINALS), _stages())
    by = {s["method"]: s for s in summary}
    assert abs(by["random"]["loss"]["wiki_en"][1] - 0.02) < 1e-12          # sample std (ddof 1)
    assert by["mates"]["curation_share"] == (0.5, 0.0)                     # 90 s over 180 s curated training
    assert by["random"]["curation_share"] == (0.02, 0.0)
    assert by["mates"]["influence_spearman"] == (sum([0.62, 0.55, 0.7, 0.62, 0.48, 0.7, 0.62, 0.55, 0.7]) / 9, 0.48)
    assert abs(by["mates"]["token_share"][0] - 150 / 400) < 1e-12
    said = verdicts(summary, off_target=["bbc_en"])
    text = "\n".join(said)
    assert "mates vs random on wiki_en: final loss lower by +0.1000; target > 2 x random's seed std = 0.0400: met" in text
    assert "group_mates vs random on wiki_en: final loss lower by +0.0200" in text and \
        "std = 0.0400: MISSED" in said[1]
    assert ("group_mates 6.0000 vs mates 5.9200 on the 3 seed(s) both finished: better by -0.0800; target > "
            "mates's seed std 0.0050: MISSED.") in text
    two_seeds = _without(_runs(), "group_mates", (17, 18))
    assert "group_mates 6.0100 vs mates 5.9200 on the 1 seed(s) both finished" in "\n".join(
        verdicts(summarize(two_seeds, list(FINALS))))
    apart = _without(two_seeds, "mates", (19,))
    assert "group_mates vs mates: not judged yet (no seed finished by both)." in verdicts(summarize(apart, list(FINALS)))
    assert "mates 5.9200 vs the best static baseline (dsir) 5.9100 + 1 std 0.0100 on wiki_en: met." in text
    assert "mates 6.3300 vs dsir 6.4100 on the off-target bbc_en: met (better than it)." in text
    assert "mates reaches random's final wiki_en loss with 38% of random's curated-stage tokens; target <= 50%: met." \
        in text
    assert ("held-out Spearman 0.62 on average, 0.48 at its worst boundary; target >= 0.6 at every boundary, judged "
            "on the held-out (no cross-validation for this backbone) figure: MISSED") in text
    one_seed = _without(_runs(), "random", (18, 19))
    assert "std = 0.0000: not judged yet (random has one seed: no std)" in verdicts(summarize(one_seed, list(FINALS)))[0]
    table = markdown_table(summary)
    assert "| mates | 3 | 5.9200 ± 0.0050 | -0.1000 | 6.3300 ± 0.0100 | 38% ± 0% | –; – | 50% ± 0% | 0.62, 0.48 |" in table


def test_a_failed_run_does_not_stop_the_others(monkeypatch):
    """Hours of finished runs stay useful: a failure is reported, the other runs still run, and a
    failed warm-up skips only its own seed's runs."""
    from types import SimpleNamespace

    from schemas.errors import MatesError
    from training import compare

    ran = []

    def fake_run(spec, threads, until_stage=None):
        ran.append(spec.label)
        if spec.label in ("seed-17-mates", "seed-18-warmup"):
            raise MatesError(f"run {spec.label} failed (exit 1): boom")
        return 1.0

    monkeypatch.setattr(compare, "run_process", fake_run)
    monkeypatch.setattr(compare, "finished", lambda recipe: False)
    monkeypatch.setattr(compare, "fork_warmup", lambda warmup, run: None)
    monkeypatch.setattr(compare, "read_parquet", lambda *a: pa.table({"stage": [1], "eval_set": ["e"], "loss": [1.0]}))
    no_state = SimpleNamespace(exists=lambda name: False)
    monkeypatch.setattr(compare, "store_for", lambda url: no_state)
    specs = [compare.RunSpec(m, seed, SimpleNamespace(checkpoint_url=f"/c/{seed}/{m}", run=f"/r/{seed}/{m}"), "", "")
             for seed in (17, 18) for m in ("warmup", "mates", "random")]
    logged = []
    failures = compare.run_all(specs, jobs=1, log=logged.append)
    assert sorted(failures) == ["run seed-17-mates failed (exit 1): boom", "run seed-18-warmup failed (exit 1): boom"]
    assert sorted(ran) == ["seed-17-mates", "seed-17-random", "seed-17-warmup", "seed-18-warmup"]
    assert any("seed-17-random: final loss e 1.0000" in line for line in logged)


def test_curated_compute_shares_and_their_verdict():
    """The compute columns: training + curation spent until random's final loss, as a share of
    random's curated-stage compute (mean over seeds), in FLOPs and seconds; judged at <= 50%."""
    rows = _runs().to_pylist()
    for r in rows:
        r.update(curated_flops=1000.0, curated_seconds=200.0)
        if r["method"] == "mates":   # reaches random's final loss with 40% of the FLOPs, 60% of the seconds
            r.update(curated_flops_to_random_final=400.0, curated_seconds_to_random_final=120.0)
        if r["method"] == "group_mates":   # 30% and 45%: met in both units
            r.update(curated_flops_to_random_final=300.0, curated_seconds_to_random_final=90.0)
    summary = summarize(pa.Table.from_pylist(rows, schema=tables.COMPARISON_RUNS), list(FINALS), _stages())
    by = {s["method"]: s for s in summary}
    assert by["mates"]["flops_share"] == pytest.approx((0.4, 0.0)) and by["mates"]["seconds_share"] == pytest.approx((0.6, 0.0))
    assert by["dsir"]["flops_share"] is None
    text = "\n".join(verdicts(summary))
    assert ("mates reaches random's final wiki_en loss with 40% of random's curated-stage FLOPs; 60% of random's "
            "curated-stage seconds (training + curation); target <= 50%: MISSED; its costliest boundary's curation "
            "is 0.50x that stage's training, target <= 0.25x: MISSED.") in text
    assert "group_mates reaches random's final wiki_en loss with 30% of random's curated-stage FLOPs; 45%" in text
    assert "45% of random's curated-stage seconds (training + curation); target <= 50%: met." in text
    table = markdown_table(summary)
    assert "curated compute to random's final loss (FLOPs; seconds)" in table
    assert "| 40%; 60% |" in table and "| –; – |" in table


def test_pair_verdicts_interaction_term_oracle_gap_and_cross_validated_spearman():
    """Group-MATES must beat MATES by more than MATES' seed std; `-no-interaction` measures the
    relational term (the same entry without it); mates is set against mates@oracle; the Spearman
    target is judged on the cross-validated figure where the backbone has one."""
    finals = {"random": [6.00, 6.02, 6.04], "mates@frozen": [5.90, 5.92, 5.91],      # std 0.01
              "group_mates@frozen": [5.87, 5.88, 5.89],                               # 0.03 better: met
              "group_mates@frozen-no-interaction": [5.88, 5.90, 5.89],               # without: +0.01 on average
              "mates": [5.95, 5.95, 5.95], "mates@oracle": [5.93, 5.94, 5.95]}
    rows = [{"method": m, "seed": seed, "run": f"/r/{m}/{seed}", "eval_set": "wiki_en", "primary": True,
             "final_loss": loss, "tokens_seen": 1000, "tokens_to_random_final": None, "curated_tokens": 400,
             "curated_tokens_to_random_final": None, "curation_seconds": 1.0, "train_seconds": 10.0}
            for m, losses in finals.items() for seed, loss in zip((17, 18, 19), losses)]
    stages = [{"method": "mates@frozen", "seed": seed, "stage": 1, "target": "wiki_en", "influence_spearman": 0.7,
               "relational_spearman": None, "influence_cv_spearman": cv, "curation_seconds": 2.0,
               "train_seconds": 10.0, "curation_share_of_training": 0.2} for seed, cv in ((17, 0.65), (18, 0.61), (19, 0.62))]
    summary = summarize(pa.Table.from_pylist(rows, schema=tables.COMPARISON_RUNS), list(finals),
                        tables.conform(pa.Table.from_pylist(stages, schema=tables.COMPARISON_STAGES),
                                       tables.COMPARISON_STAGES))
    text = "\n".join(verdicts(summary))
    assert ("group_mates@frozen 5.8800 vs mates@frozen 5.9100 on the 3 seed(s) both finished: better by +0.0300; "
            "target > mates@frozen's seed std 0.0100: met.") in text
    assert ("group_mates@frozen's interaction term: 5.8800 with it, 5.8900 without (group_mates@frozen-no-interaction) "
            "on 3 seed(s): it lowers the loss by +0.0100 (per seed +0.0100, +0.0200, +0.0000)") in text
    assert "group_mates@frozen-no-interaction vs random on wiki_en: final loss lower by +0.1300" in text
    assert "mates 5.9500 vs mates@oracle 5.9400 (the oracle scoring every candidate) on 3 seed(s): mates is worse by 0.0100." in text
    assert ("mates@frozen: influence model held-out Spearman 0.70 on average, 0.70 at its worst boundary; 5-fold "
            "cross-validated 0.63 on average, 0.61 at its worst; target >= 0.6 at every boundary, judged on the "
            "cross-validated figure: met.") in text
    assert "| 0.70, 0.70; CV 0.63, 0.61 |" in markdown_table(summary)


def test_with_earlier_fills_in_the_runs_this_comparison_lacks(tmp_path):
    """`mates compare --from FOLDER`: this comparison's runs come first, an earlier one's committed
    tables fill in the runs it lacks, and entries outside `--methods` are left out."""
    from schemas.storage import write_parquet
    from training.compare_tables import COMPARISON_METRICS, with_earlier

    def tables_of(method_seeds, loss):
        runs = [r for r in _runs().to_pylist() if (r["method"], r["seed"]) in method_seeds]
        for r in runs:
            r["final_loss"] = loss
        metrics = [{"method": m, "seed": s, "stage": 1, "eval_set": "wiki_en", "loss_kind": "lm", "loss": loss,
                    "perplexity": 1.0, "batches_seen": 1, "tokens_seen": 1, "train_tokens_per_s": 1.0,
                    "curation_seconds": 0.0, "train_seconds": 1.0} for m, s in method_seeds]
        stages = [{"method": m, "seed": s, "stage": 1, "curation_seconds": loss} for m, s in method_seeds]
        audits = [{"method": m, "seed": s, "stage": 1, "group_by": "source", "group": "wiki_en", "candidates": 1,
                   "candidate_share": 1.0, "selected_share": 1.0, "score_mean_z": 0.0, "probes": 0}
                  for m, s in method_seeds]
        return tuple(tables.conform(pa.Table.from_pylist(rows, schema=schema), schema) for rows, schema in
                     ((runs, tables.COMPARISON_RUNS), (metrics, COMPARISON_METRICS), (stages, tables.COMPARISON_STAGES),
                      (audits, tables.COMPARISON_AUDITS)))

    earlier = tables_of({("random", 17), ("mates", 17), ("dsir", 17)}, 1.0)
    for table, name in zip(earlier, ("runs", "metrics", "stages", "audits")):
        write_parquet(table, str(tmp_path), f"{name}.parquet")
    today = tables_of({("random", 17), ("group_mates", 17)}, 2.0)
    merged = with_earlier(today, [str(tmp_path)], ["random", "mates", "group_mates"])
    for table, key in zip(merged, ("final_loss", "loss", "curation_seconds", None)):
        rows = table.to_pylist()
        assert {(r["method"], r["seed"]) for r in rows} == {("random", 17), ("mates", 17), ("group_mates", 17)}
        if key:   # random and group_mates from today's runs, mates from the earlier folder
            value = {r["method"]: r[key] for r in rows}
            assert (value["random"], value["mates"], value["group_mates"]) == (2.0, 1.0, 2.0)
    with pytest.raises(Exception, match="holds no runs.parquet"):
        with_earlier(today, [str(tmp_path / "nowhere")], ["random"])
