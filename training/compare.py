"""`mates compare`: one recipe, several curation methods and seeds, the same budget, one table.

Layout under `out` (a local folder):
    recipes/seed-<s>-<method>.yaml   the resolved recipe of every run (re-runnable with `mates run`)
    runs/seed-<s>/warmup/            stage 0 of seed s, trained once
    runs/seed-<s>/<method>/          one run per method, forked from the warm-up
    logs/seed-<s>-<method>.log       each run's console output
    runs.parquet, metrics.parquet, comparison.md, comparison.json

Stage 0 is the random warm-up: it does not depend on the method. For each seed it is trained
once and every method's run starts from a copy of it (stage 0's index, its state file and its
metrics rows), so M methods train stage 0 once instead of M times and all start from the very
same model. Every run is its own `mates run` process, `jobs` at a time; with more than one at a
time each process gets cores // jobs torch threads (more would oversubscribe the cores).
Finished runs are kept: running the same comparison again only runs what is missing.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation.index_writer import stage_url
from schemas import streams, tables
from schemas.errors import MatesError
from schemas.recipe import METHOD_OPTIONS, Recipe, dump_recipe, load_recipe
from schemas.storage import join, read_parquet, store_for, write_parquet

WARMUP = "warmup"
# The model-aware methods cost the most: start them first so the slots stay full at the end.
COST_ORDER = ["group_mates", "mates", "perplexity", "classifier", "dsir", "random"]

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


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_OPTIONS]
    if not methods or unknown:
        raise MatesError(f"`--methods` must be a comma-separated list of {', '.join(sorted(METHOD_OPTIONS))}; "
                         f"got {text!r}.")
    if len(set(methods)) != len(methods):
        raise MatesError(f"`--methods` names a method twice: {text!r}.")
    return methods


def plan(recipe_file: str, overrides: dict, methods: list[str], n_seeds: int, out: str) -> list[RunSpec]:
    """Every run's recipe, validated before anything is trained; written under `out/recipes/`."""
    if n_seeds < 1:
        raise MatesError(f"`--seeds` must be >= 1; got {n_seeds}.")
    base = load_recipe(recipe_file, overrides)
    if base.stages.count < 2:
        raise MatesError(f"`stages.count` must be >= 2 for a comparison (stage 0 is the random warm-up); "
                         f"got {base.stages.count}.")
    out = os.path.abspath(out)
    specs = []
    for seed in range(base.seed, base.seed + n_seeds):
        for method in [WARMUP] + methods:
            run = os.path.join(out, "runs", f"seed-{seed}", method)
            recipe = load_recipe(recipe_file, {**overrides, "seed": seed, "run": run, "save_folder": None,
                                               "stages.method": "random" if method == WARMUP else method})
            label = f"seed-{seed}-{method}"
            specs.append(RunSpec(method, seed, recipe, os.path.join(out, "recipes", f"{label}.yaml"),
                                 os.path.join(out, "logs", f"{label}.log")))
    for spec in specs:
        os.makedirs(os.path.dirname(spec.recipe_file), exist_ok=True)
        with open(spec.recipe_file, "w", encoding="utf-8") as handle:
            handle.write(dump_recipe(spec.recipe))
    return specs


# ---------------------------------------------------------------- forking the warm-up
def fork_warmup(warmup: Recipe, run: Recipe) -> None:
    """Copy stage 0 of the warm-up run into `run`: index (remotes rewritten), metrics, state last."""
    src, dst = store_for(warmup.run), store_for(run.run)
    if store_for(run.checkpoint_url).exists("stage-0-state.pt"):
        return
    files = [f for f in src.walk_files("stages", "0") if not f.endswith("_SUCCESS")]
    for rel in files:
        dst.write_bytes(src.read_bytes(rel), rel)
    entries = streams.parse_manifest(src.read_bytes("stages", "0", "index", "streams.json"), warmup.run)
    moved = [streams.StreamEntry(name=e.name, path=e.path, remote=join(stage_url(run.run, 0), "index", e.path),
                                 proportion=e.proportion, samples=e.samples) for e in entries]
    dst.write_bytes(streams.manifest_json(moved, stage=0, method="random"), "stages", "0", "index", "streams.json")
    dst.write_bytes(streams.foundry_yaml(moved), "stages", "0", "index", "streams.yaml")
    dst.write_bytes(src.read_bytes("stages", "0", "_SUCCESS"), "stages", "0", "_SUCCESS")
    dst.write_bytes(src.read_bytes("metrics.parquet"), "metrics.parquet")
    ckpt_src, ckpt_dst = store_for(warmup.checkpoint_url), store_for(run.checkpoint_url)
    for name in ("stage-0.pt", "stage-0-state.pt"):  # the state file marks stage 0 trained: last
        ckpt_dst.write_bytes(ckpt_src.read_bytes(name), name)


# ---------------------------------------------------------------- running
def run_process(spec: RunSpec, threads: int, until_stage: int | None = None) -> float:
    """`mates run` of one spec in its own process; returns its wall seconds."""
    cmd = [sys.executable, "-m", "jobs.cli", "run", spec.recipe_file]
    if until_stage is not None:
        cmd += ["--until-stage", str(until_stage)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(os.path.dirname(spec.log_file), exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    with open(spec.log_file, "w", encoding="utf-8") as log_handle:
        code = subprocess.call(cmd, stdout=log_handle, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        with open(spec.log_file, encoding="utf-8", errors="replace") as handle:
            last = (handle.read().strip().splitlines() or ["(no output)"])[-1]
        raise MatesError(f"run {spec.label} failed (exit {code}): {last} (log: {spec.log_file})")
    return time.perf_counter() - t0


def finished(recipe: Recipe) -> bool:
    last = recipe.stages.count - 1
    return store_for(recipe.checkpoint_url).exists(f"stage-{last}-state.pt") and \
        store_for(recipe.run).exists("metrics.parquet")


def run_all(specs: list[RunSpec], jobs: int, log=print) -> None:
    """Warm-ups first; each seed's method runs start as soon as its warm-up is done."""
    if jobs < 1:
        raise MatesError(f"`--jobs` must be >= 1; got {jobs}.")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    warmups = {s.seed: s for s in specs if s.method == WARMUP}
    rank = {m: i for i, m in enumerate(COST_ORDER)}
    todo = sorted((s for s in specs if s.method != WARMUP and not finished(s.recipe)),
                  key=lambda s: (rank.get(s.method, 0), s.seed))
    total, done, started = len(todo), 0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running, ready = {}, set()
        for seed, spec in warmups.items():
            if store_for(spec.recipe.checkpoint_url).exists("stage-0-state.pt"):
                ready.add(seed)
            elif any(s.seed == seed for s in todo):
                running[pool.submit(run_process, spec, threads, 0)] = spec

        def submit_ready():
            for spec in [s for s in todo if s.seed in ready]:
                todo.remove(spec)
                fork_warmup(warmups[spec.seed].recipe, spec.recipe)
                running[pool.submit(run_process, spec, threads)] = spec

        submit_ready()
        while running:
            finished_now, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished_now:
                spec = running.pop(future)
                seconds = future.result()  # a failed run stops the comparison with its log's last line
                if spec.method == WARMUP:
                    ready.add(spec.seed)
                    log(f"compare: {spec.label} (stage 0) done in {seconds:.0f} s")
                else:
                    done += 1
                    final = read_parquet(spec.recipe.run, "metrics.parquet").to_pylist()[-1]
                    log(f"compare: [{done}/{total}] {spec.label}: final cloze loss {final['cloze_loss']:.4f} "
                        f"in {seconds:.0f} s ({time.perf_counter() - started:.0f} s elapsed)")
            submit_ready()


# ---------------------------------------------------------------- the table
def tokens_to_reach(tokens: list[float], losses: list[float], target: float) -> float | None:
    """First training-token count at which the loss curve reaches `target` (linear in between)."""
    for i, (t, loss) in enumerate(zip(tokens, losses)):
        if loss <= target:
            if i == 0:
                return float(t)
            t0, l0 = tokens[i - 1], losses[i - 1]
            return float(t0 + (t - t0) * (l0 - target) / (l0 - loss))
    return None


def collect(specs: list[RunSpec]) -> tuple[pa.Table, pa.Table]:
    """(runs table, per-stage metrics of every run) of the finished method runs."""
    per_run = [(spec, sorted(read_parquet(spec.recipe.run, "metrics.parquet").to_pylist(), key=lambda r: r["stage"]))
               for spec in specs if spec.method != WARMUP and finished(spec.recipe)]
    random_finals = [rows[-1]["cloze_loss"] for s, rows in per_run if s.method == "random"]
    target = float(np.mean(random_finals)) if random_finals else None
    runs, metrics = [], []
    for spec, rows in per_run:
        tokens = [r["tokens_seen"] for r in rows]
        losses = [r["cloze_loss"] for r in rows]
        runs.append({"method": spec.method, "seed": spec.seed, "run": spec.recipe.run,
                     "final_cloze_loss": losses[-1], "final_heldout_perplexity": rows[-1]["heldout_perplexity"],
                     "tokens_seen": tokens[-1],
                     "tokens_to_random_final": None if target is None else tokens_to_reach(tokens, losses, target),
                     "curation_seconds": sum(r["curation_seconds"] for r in rows if r["stage"] >= 1),
                     "train_seconds": sum(r["train_seconds"] for r in rows)})
        metrics += [{"method": spec.method, "seed": spec.seed, **r} for r in rows]
    return (tables.conform(pa.Table.from_pylist(runs, schema=tables.COMPARISON_RUNS), tables.COMPARISON_RUNS),
            tables.conform(pa.Table.from_pylist(metrics, schema=COMPARISON_METRICS), COMPARISON_METRICS))


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: pa.Table, methods: list[str]) -> list[dict]:
    """Per method: mean and sample standard deviation over seeds of every column of the table."""
    rows = runs.to_pylist()
    random_tokens = [r["tokens_seen"] for r in rows if r["method"] == "random"]
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        reached = [r["tokens_to_random_final"] for r in mine if r["tokens_to_random_final"] is not None]
        share = [t / float(np.mean(random_tokens)) for t in reached] if random_tokens else []
        out.append({
            "method": method, "seeds": len(mine),
            "cloze": _mean_std([r["final_cloze_loss"] for r in mine]),
            "ppl": _mean_std([r["final_heldout_perplexity"] for r in mine]),
            "token_share": _mean_std(share) if share else None, "reached": len(reached),
            "curation_share": _mean_std([r["curation_seconds"] / max(r["train_seconds"], 1e-9) for r in mine]),
        })
    return out


def markdown_table(summary: list[dict]) -> str:
    base = next((s for s in summary if s["method"] == "random"), None)
    lines = ["| method | seeds | final cloze loss | vs random | held-out ppl | tokens to random's final loss "
             "| curation time / training time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        (c, cs), (p, ps), (q, qs) = s["cloze"], s["ppl"], s["curation_share"]
        delta = f"{c - base['cloze'][0]:+.4f}" if base else "n/a"
        if s["token_share"] is None:
            tokens = f"not reached (0/{s['seeds']})"
        else:
            t, ts = s["token_share"]
            tokens = f"{100 * t:.0f}% ± {100 * ts:.0f}%" + ("" if s["reached"] == s["seeds"]
                                                          else f" ({s['reached']}/{s['seeds']} reached)")
        lines.append(f"| {s['method']} | {s['seeds']} | {c:.4f} ± {cs:.4f} | {delta} | {p:.1f} ± {ps:.1f} "
                     f"| {tokens} | {100 * q:.0f}% ± {100 * qs:.0f}% |")
    return "\n".join(lines)


def verdicts(summary: list[dict]) -> list[str]:
    """The issue's three targets, each said as met or missed with the numbers behind it."""
    by = {s["method"]: s for s in summary}
    if "random" not in by:
        return []
    rc, rs = by["random"]["cloze"]
    out = []
    for m in ("mates", "group_mates"):
        if m in by:
            gain = rc - by[m]["cloze"][0]
            out.append(f"{m} vs random: final cloze loss lower by {gain:+.4f}; target > 2 x random's seed std "
                       f"= {2 * rs:.4f}: {'met' if gain > 2 * rs else 'MISSED'}.")
    if "mates" in by and "group_mates" in by:
        gm, m = by["group_mates"]["cloze"][0], by["mates"]["cloze"][0]
        out.append(f"group_mates {gm:.4f} vs mates {m:.4f}: {'met' if gm <= m else 'MISSED'} (at least matches).")
    if "mates" in by:
        share = by["mates"]["token_share"]
        ok = share is not None and by["mates"]["reached"] == by["mates"]["seeds"] and share[0] <= 0.5
        said = "never reached" if share is None else f"{100 * share[0]:.0f}% of random's tokens"
        out.append(f"mates reaches random's final cloze loss with {said}; target <= 50%: {'met' if ok else 'MISSED'}.")
    return out


def write_outputs(out: str, runs: pa.Table, metrics: pa.Table, methods: list[str], command: str) -> str:
    summary = summarize(runs, methods)
    lines = ["# mates compare", "", f"Command: `{command}`", "",
             "Mean ± sample standard deviation over seeds. Tokens to random's final loss: training tokens "
             "at which a run's cloze loss first reaches random's mean final cloze loss (linear between "
             "the evaluations at stage ends), as a share of random's tokens.", "",
             markdown_table(summary), "", *[f"- {v}" for v in verdicts(summary)], ""]
    text = "\n".join(lines)
    write_parquet(runs, out, "runs.parquet")
    write_parquet(metrics, out, "metrics.parquet")
    store = store_for(out)
    store.write_bytes(text.encode(), "comparison.md")
    safe = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()} for s in summary]
    store.write_bytes(json.dumps({"format": "mates-comparison", "version": 1, "command": command,
                                  "methods": methods, "summary": safe}, indent=2).encode(), "comparison.json")
    return text


def compare(recipe_file: str, overrides: dict, methods: list[str], n_seeds: int, out: str, *, jobs: int = 1,
            command: str = "", log=print) -> str:
    if "://" in out:
        raise MatesError(f"`--out` must be a local folder (the runs inside may use any store); got {out!r}.")
    specs = plan(recipe_file, overrides, methods, n_seeds, out)
    run_all(specs, jobs, log=log)
    runs, metrics = collect(specs)
    return write_outputs(os.path.abspath(out), runs, metrics, methods, command)
