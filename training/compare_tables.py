"""The tables and verdicts of `mates compare`: collect finished runs' metrics and stage tables,
summarise them per method (mean ± std over seeds, tokens to random's final loss, curation share),
and write comparison.md / comparison.json (the runs themselves: training/compare.py)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation.store.stage_index import stage_url
from schemas import tables
from schemas.errors import MatesError
from schemas.recipe import Recipe
from schemas.storage import read_parquet, store_for, write_parquet
from training.compare_verdicts import verdicts

WARMUP = "warmup"  # the method name of a seed's stage-0 run

COMPARISON_METRICS = tables._schema("comparison_metrics", [
    pa.field("method", pa.string(), nullable=False), pa.field("seed", pa.int64(), nullable=False),
    *tables.METRICS])


@dataclass(frozen=True, eq=False)
class RunSpec:
    method: str            # a curation method, or WARMUP (stage 0 only)
    seed: int
    recipe: Recipe
    recipe_file: str
    log_file: str

    @property
    def label(self) -> str:
        return f"seed-{self.seed}-{self.method}"


def finished(recipe: Recipe) -> bool:
    last = recipe.stages.count - 1
    return store_for(recipe.checkpoint_url).exists(f"stage-{last}-state.pt") and \
        store_for(recipe.run).exists("metrics.parquet")


def tokens_to_reach(tokens: list[float], losses: list[float], target: float) -> float | None:
    """First training-token count at which the loss curve reaches `target` (linear in between)."""
    for i, (t, loss) in enumerate(zip(tokens, losses)):
        if loss <= target:
            if i == 0:
                return float(t)
            t0, l0 = tokens[i - 1], losses[i - 1]
            return float(t0 + (t - t0) * (l0 - target) / (l0 - loss))
    return None


def primary_eval_of(recipe: Recipe) -> str:
    """The eval set this run's comparison ranks by (eval.primary, or the pool's default)."""
    from curation.data.ingest import read_pool_marker
    from curation.data.sets import resolve_primary_eval

    return resolve_primary_eval(read_pool_marker(recipe.data), recipe.eval.primary, "eval.primary", recipe.data)


def off_target_sets(recipe: Recipe) -> list[str]:
    """The pool's eval sets named like none of its targets: general English off the target's domain."""
    from curation.data.ingest import read_pool_marker
    from curation.data.sets import pool_sets

    marker = read_pool_marker(recipe.data)
    targets = set(pool_sets(marker, "targets"))
    return [e for e in pool_sets(marker, "eval") if e not in targets]


def _curve(rows: list[dict], eval_set: str) -> tuple[list[float], list[float]]:
    mine = sorted((r for r in rows if r["eval_set"] == eval_set), key=lambda r: r["stage"])
    return [r["tokens_seen"] for r in mine], [r["loss"] for r in mine]


def curated_compute(run_url: str, stages: list[dict]) -> dict[str, list[float] | None]:
    """{"flops", "seconds"}: cumulative training + curation of the curated stages at the end of
    stage 0, 1, ... (0 at stage 0: the warm-up is every method's); None without the ledger."""
    from curation.store.stage_index import read_stage_marker
    from schemas.costs import stage_compute

    out = {"flops": [0.0], "seconds": [0.0]}
    for row in (r for r in stages if r["stage"] >= 1):
        marker = read_stage_marker(run_url, row["stage"])
        # a curated stage's marker must carry the ledger: a missing one is no cost of 0
        marker = {k: marker.get(k) for k in ("curation_flops", "curation_seconds")}
        for unit, cost in zip(("flops", "seconds"), stage_compute(row, marker)):
            if out[unit] is not None:
                out[unit] = None if cost is None else out[unit] + [out[unit][-1] + cost]
    return out


def collect(specs: list[RunSpec]) -> tuple[pa.Table, pa.Table]:
    """(runs table: one row per run and eval set, per-stage metrics of every run) of the finished runs."""
    per_run = [(spec, read_parquet(spec.recipe.run, "metrics.parquet").to_pylist())
               for spec in specs if spec.method != WARMUP and finished(spec.recipe)]
    primary = primary_eval_of(per_run[0][0].recipe) if per_run else None
    eval_sets = list(dict.fromkeys(r["eval_set"] for _, rows in per_run for r in rows))
    random_finals = {e: float(np.mean([_curve(rows, e)[1][-1] for s, rows in per_run if s.method == "random"]))
                     for e in eval_sets if any(s.method == "random" for s, _ in per_run)}
    runs, metrics = [], []
    for spec, rows in per_run:
        stages = tables.metrics_by_stage(rows)  # the per-stage fields, once per stage
        warm = max((r["tokens_seen"] for r in stages if r["stage"] == 0), default=0)  # at the first boundary
        compute = curated_compute(spec.recipe.run, stages)
        for e in eval_sets:
            tokens, losses = _curve(rows, e)
            reach = tokens_to_reach(tokens, losses, random_finals[e]) if e in random_finals else None
            curated_losses = [r["loss"].get(e) for r in stages if r["stage"] >= 0]
            spent = {unit: None if curve is None or e not in random_finals or None in curated_losses
                     or len(curve) != len(curated_losses)
                     else tokens_to_reach(curve, curated_losses, random_finals[e]) for unit, curve in compute.items()}
            runs.append({"method": spec.method, "seed": spec.seed, "run": spec.recipe.run, "eval_set": e,
                         "primary": e == primary, "final_loss": losses[-1], "tokens_seen": tokens[-1],
                         "tokens_to_random_final": reach, "curated_tokens": tokens[-1] - warm,
                         "curated_tokens_to_random_final": None if reach is None else max(reach - warm, 0.0),
                         "curation_seconds": sum(r["curation_seconds"] for r in stages if r["stage"] >= 1),
                         "train_seconds": sum(r["train_seconds"] for r in stages),
                         **{f"curated_{unit}": None if curve is None else curve[-1] for unit, curve in compute.items()},
                         **{f"curated_{unit}_to_random_final": v for unit, v in spent.items()}})
        metrics += [{"method": spec.method, "seed": spec.seed, **r} for r in rows]
    return (tables.conform(pa.Table.from_pylist(runs, schema=tables.COMPARISON_RUNS), tables.COMPARISON_RUNS),
            tables.conform(pa.Table.from_pylist(metrics, schema=COMPARISON_METRICS), COMPARISON_METRICS))


def collect_stages(specs: list[RunSpec], metrics: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(one row per curated stage of every finished run: fit quality and costs, every stage audit);
    `metrics`: `collect`'s per-stage metrics of the finished runs."""
    from curation.store.stage_index import read_stage_marker

    per_run: dict[tuple, list] = {}
    for r in metrics.to_pylist():
        per_run.setdefault((r["method"], r["seed"]), []).append(r)
    stages, audits = [], []
    for spec in specs:
        if (spec.method, spec.seed) not in per_run:  # the warm-ups, and runs not finished
            continue
        by_stage = {r["stage"]: r for r in tables.metrics_by_stage(per_run[spec.method, spec.seed])}
        for k in range(1, spec.recipe.stages.count):
            marker, row = read_stage_marker(spec.recipe.run, k), by_stage.get(k, {})
            train = row.get("train_seconds")
            stages.append({"method": spec.method, "seed": spec.seed, "stage": k, "target": marker.get("target"),
                           "influence_spearman": marker.get("curation/influence/val_spearman"),
                           "relational_spearman": marker.get("curation/relational/val_spearman"),
                           "influence_cv_spearman": marker.get("curation/influence/cv_spearman"),
                           "curation_seconds": float(marker.get("curation_seconds", 0.0)), "train_seconds": train,
                           "curation_flops": marker.get("curation_flops"),
                           "curation_share_of_training": marker.get("curation_seconds", 0.0) / train
                           if train else None})
            if store_for(stage_url(spec.recipe.run, k)).exists("audit.parquet"):
                audits += [{"method": spec.method, "seed": spec.seed, **r}
                           for r in read_parquet(stage_url(spec.recipe.run, k), "audit.parquet").to_pylist()]
    return (tables.conform(pa.Table.from_pylist(stages, schema=tables.COMPARISON_STAGES), tables.COMPARISON_STAGES),
            tables.conform(pa.Table.from_pylist(audits, schema=tables.COMPARISON_AUDITS), tables.COMPARISON_AUDITS))


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: pa.Table, methods: list[str], stages: pa.Table | None = None) -> list[dict]:
    """Per method: mean and sample std over seeds of every eval set's final loss; on the primary
    set the share of random's curated-stage tokens needed to reach random's final loss; from the
    stages table, curation seconds per curated-stage training second and the influence model's
    held-out and (frozen heads) 5-fold cross-validated Spearman, mean and minimum over every
    boundary of every seed."""
    rows = runs.to_pylist()
    stage_rows = [] if stages is None else stages.to_pylist()
    sets = list(dict.fromkeys(r["eval_set"] for r in rows))
    primary = next((r["eval_set"] for r in rows if r["primary"]), sets[0] if sets else None)
    random_curated = [r["curated_tokens"] for r in rows if r["method"] == "random" and r["primary"]]
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        prim = [r for r in mine if r["eval_set"] == primary]
        reached = [r["curated_tokens_to_random_final"] for r in prim if r["curated_tokens_to_random_final"] is not None]
        share = [t / float(np.mean(random_curated)) for t in reached] if random_curated else []
        compute_share = {}  # unit -> share of random's curated-stage compute spent to reach its final loss
        for unit in ("flops", "seconds"):
            base = [r[f"curated_{unit}"] for r in rows if r["method"] == "random" and r["primary"]
                    and r.get(f"curated_{unit}")]
            spent = [r.get(f"curated_{unit}_to_random_final") for r in prim]
            compute_share[unit] = _mean_std([v / float(np.mean(base)) for v in spent if v is not None]) \
                if base and any(v is not None for v in spent) else None
        boundaries = [r for r in stage_rows if r["method"] == method]
        per_seed = {}  # seed -> (curation seconds, curated-stage training seconds)
        for r in boundaries:
            c, t = per_seed.get(r["seed"], (0.0, 0.0))
            per_seed[r["seed"]] = (c + r["curation_seconds"], t + (r["train_seconds"] or 0.0))
        spearman = [r["influence_spearman"] for r in boundaries if r["influence_spearman"] is not None]
        cv = [r.get("influence_cv_spearman") for r in boundaries if r.get("influence_cv_spearman") is not None]
        shares = [r["curation_share_of_training"] for r in boundaries if r.get("curation_share_of_training") is not None]
        relational = [r["relational_spearman"] for r in boundaries if r["relational_spearman"] is not None]
        out.append({
            "method": method, "seeds": len(prim), "primary": primary,
            "loss": {e: _mean_std([r["final_loss"] for r in mine if r["eval_set"] == e]) for e in sets},
            "token_share": _mean_std(share) if share else None, "reached": len(reached),
            "flops_share": compute_share["flops"], "seconds_share": compute_share["seconds"],
            "curation_share": _mean_std([c / t for c, t in per_seed.values() if t > 0]) if per_seed else
            _mean_std([r["curation_seconds"] / max(r["train_seconds"], 1e-9) for r in prim]),
            "primary_by_seed": {r["seed"]: r["final_loss"] for r in prim},
            "influence_spearman": (float(np.mean(spearman)), float(np.min(spearman))) if spearman else None,
            "influence_cv_spearman": (float(np.mean(cv)), float(np.min(cv))) if cv else None,
            "boundary_share_max": max(shares) if shares else None,  # the costliest boundary's curation / training
            "relational_spearman": (float(np.mean(relational)), float(np.min(relational))) if relational else None,
        })
    return out


def markdown_table(summary: list[dict]) -> str:
    if not summary:
        return "(no finished run)"
    base = next((s for s in summary if s["method"] == "random"), None)
    primary = summary[0]["primary"]
    others = [e for e in summary[0]["loss"] if e != primary]
    lines = [f"| method | seeds | {primary} (primary) | vs random | " + " | ".join(others) +
             (" | " if others else "") + "curated tokens to random's final loss | curated compute to random's "
             "final loss (FLOPs; seconds) | curation time / curated-stage training time | influence model "
             "held-out Spearman (mean, min) |",
             "| --- | ---: | ---: | ---: | " + "---: | " * len(others) + "---: | ---: | ---: | ---: |"]
    for s in summary:
        (c, cs), (q, qs) = s["loss"][primary], s["curation_share"]
        delta = f"{c - base['loss'][primary][0]:+.4f}" if base else "n/a"
        cells = "".join(f"{s['loss'][e][0]:.4f} ± {s['loss'][e][1]:.4f} | " if e in s["loss"] else "– | "
                        for e in others)
        if s["token_share"] is None:
            tokens = f"not reached (0/{s['seeds']})"
        else:
            t, ts = s["token_share"]
            tokens = f"{100 * t:.0f}% ± {100 * ts:.0f}%" + ("" if s["reached"] == s["seeds"]
                                                          else f" ({s['reached']}/{s['seeds']} reached)")
        fits = [f"{name}{m:.2f}, {lo:.2f}" for name, v in (("", s.get("influence_spearman")),
                                                         ("CV ", s.get("influence_cv_spearman")),
                                                         ("relational ", s.get("relational_spearman")))
                if v for m, lo in [v]]
        compute = "; ".join("–" if s.get(f"{u}_share") is None else f"{100 * s[f'{u}_share'][0]:.0f}%"
                            for u in ("flops", "seconds"))
        lines.append(f"| {s['method']} | {s['seeds']} | {c:.4f} ± {cs:.4f} | {delta} | {cells}"
                     f"{tokens} | {compute} | {100 * q:.0f}% ± {100 * qs:.0f}% | {'; '.join(fits) or '–'} |")
    return "\n".join(lines)


COMPARISON_TABLES = ("runs.parquet", "metrics.parquet", "stages.parquet", "audits.parquet")


def with_earlier(current: tuple[pa.Table, ...], folders: list[str], methods: list[str]) -> tuple[pa.Table, ...]:
    """`current` (runs, metrics, stages, audits) completed from earlier comparisons' committed
    tables in `folders`: a (method, seed) of `methods` that this comparison has no finished run of
    is taken from the first folder that has it. So an entry re-run or added today joins a
    comparison whose run folders are gone, and the entries not re-run keep their published figures."""
    schemas = (tables.COMPARISON_RUNS, COMPARISON_METRICS, tables.COMPARISON_STAGES, tables.COMPARISON_AUDITS)
    taken = {(r["method"], r["seed"]) for r in current[0].to_pylist()}    # the runs this comparison has
    extra: dict[str, list[dict]] = {name: [] for name in COMPARISON_TABLES}
    for folder in folders:
        if not store_for(folder).exists("runs.parquet"):
            raise MatesError(f"`--from` {folder!r} holds no runs.parquet: not a `mates compare` output folder.")
        found = {(r["method"], r["seed"]) for r in read_parquet(folder, "runs.parquet").to_pylist()
                 if r["method"] in methods} - taken
        for name in COMPARISON_TABLES:
            if store_for(folder).exists(name):
                extra[name] += [r for r in read_parquet(folder, name).to_pylist() if (r["method"], r["seed"]) in found]
        taken |= found
    return tuple(tables.conform(pa.Table.from_pylist(table.to_pylist() + extra[name], schema=schema), schema)
                 for table, name, schema in zip(current, COMPARISON_TABLES, schemas))


def write_outputs(out: str, runs: pa.Table, metrics: pa.Table, methods: list[str], command: str,
                  stage_tables: tuple[pa.Table, pa.Table] | None = None, off_target: list[str] = ()) -> str:
    summary = summarize(runs, methods, None if stage_tables is None else stage_tables[0])
    lines = ["# mates compare", "", f"Command: `{command}`", "",
             "Final loss on every eval set (mean ± sample standard deviation over seeds); the table is "
             "ranked by the primary set. Curated tokens to random's final loss: training tokens after the "
             "first boundary (the random warm-up is the same for every method, so it is not counted) at "
             "which a run's primary loss first reaches random's mean final primary loss (linear between "
             "the evaluations at stage ends), as a share of random's curated-stage tokens. Curated compute: the "
             "same for training + curation of the curated stages (the compute ledger), in FLOPs and seconds. "
             "Curation time: the "
             "seconds of every boundary's curation (the embedding passes included) over the measured "
             "training seconds of the curated stages. Held-out Spearman: the influence model's, on its "
             "held-out probes, at each boundary (CV: 5-fold cross-validated, frozen heads; relational: "
             "Group-MATES' relational model on its held-out trajectories).", "",
             markdown_table(summary), "", *[f"- {v}" for v in verdicts(summary, off_target)], ""]
    text = "\n".join(lines)
    write_parquet(runs, out, "runs.parquet")
    write_parquet(metrics, out, "metrics.parquet")
    for name, table in zip(("stages.parquet", "audits.parquet"), stage_tables or ()):
        write_parquet(table, out, name)
    store = store_for(out)
    store.write_bytes(text.encode(), "comparison.md")
    safe = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()} for s in summary]
    store.write_bytes(json.dumps({"format": "mates-comparison", "version": 1, "command": command,
                                  "methods": methods, "summary": safe}, indent=2).encode(), "comparison.json")
    return text


