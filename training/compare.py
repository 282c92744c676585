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

import dataclasses
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from curation.store.stage_index import stage_url
from schemas import streams
from schemas.errors import MatesError
from schemas.method_options import METHOD_OPTIONS
from schemas.recipe import Recipe, dump_recipe, load_recipe, method_options_key
from schemas.storage import join, read_parquet, store_for
from training.compare_tables import (WARMUP, RunSpec, collect, collect_stages, finished, off_target_sets,
                                     primary_eval_of, with_earlier, write_outputs)
from training.compare_verdicts import NO_INTERACTION, split_entry

# The model-aware methods cost the most: start them first so the slots stay full at the end.
COST_ORDER = ["group_mates", "mates", "perplexity", "classifier", "dsir", "random"]  # by method (an entry METHOD@BACKBONE ranks as METHOD)

BACKBONE_ENTRIES = ("mates", "group_mates")  # the methods with an influence-model backbone


def parse_methods(text: str) -> list[str]:
    """Comparison entries: method names, `METHOD@BACKBONE` (e.g. `mates@frozen`) for a model-aware
    method with another `backbone` than the recipe's, as an entry of its own, and a group_mates
    entry + `-no-interaction` (e.g. `group_mates@frozen-no-interaction`): its greedy without the
    relational term, which measures what the interactions add."""
    entries = [m.strip() for m in text.split(",") if m.strip()]

    def ok(entry: str) -> bool:
        method, backbone, interaction = split_entry(entry)
        return method in METHOD_OPTIONS and (interaction or method == "group_mates") and (
            not backbone or (method in BACKBONE_ENTRIES and backbone in ("finetune", "frozen"))
            or entry in ("mates@oracle", "mates@ngram"))
    if not entries or not all(ok(e) for e in entries):
        raise MatesError(f"`--methods` must be a comma-separated list of {', '.join(sorted(METHOD_OPTIONS))}, "
                         f"or mates@frozen / group_mates@frozen / mates@oracle / mates@ngram (a backbone), "
                         f"or a group_mates entry + {NO_INTERACTION} (e.g. group_mates@frozen{NO_INTERACTION}); "
                         f"got {text!r}.")
    if len(set(entries)) != len(entries):
        raise MatesError(f"`--methods` names a method twice: {text!r}.")
    return entries


def entry_overrides(entry: str, base: Recipe) -> dict:
    """The recipe keys an entry sets: its method, for `METHOD@BACKBONE` that method's backbone, and
    for `...-no-interaction` its `interaction: false`."""
    method, backbone, interaction = split_entry(entry)
    out = {"stages.method": "random" if entry == WARMUP else method}
    key = method_options_key(dataclasses.replace(base.stages, method=method))  # one block, or per method
    if backbone:
        out[f"{key}.backbone"] = backbone
    if not interaction:
        out[f"{key}.interaction"] = False
    return out


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
            keys = {**overrides, "seed": seed, "run": run, "save_folder": None, **entry_overrides(method, base)}
            recipe = load_recipe(recipe_file, keys)
            if getattr(recipe.method_options, "backbone", None) == "frozen" and method != WARMUP:
                # its own embedding store: a store shared by the entries and seeds over one pool
                # charges each embedding to whichever run computed it first, so a later frozen run's
                # boundaries looked free of the encoder pass (issue 25's compute columns)
                recipe = load_recipe(recipe_file, {**keys, f"{method_options_key(recipe.stages)}.embeddings_url":
                                                   os.path.join(run, "embeddings")})
            label = f"seed-{seed}-{method}"
            specs.append(RunSpec(method, seed, recipe, os.path.join(out, "recipes", f"{label}.yaml"),
                                 os.path.join(out, "logs", f"{label}.log")))
    _check_pool_keys(base, [s.recipe for s in specs])
    for spec in specs:
        os.makedirs(os.path.dirname(spec.recipe_file), exist_ok=True)
        with open(spec.recipe_file, "w", encoding="utf-8") as handle:
            handle.write(dump_recipe(spec.recipe))
    return specs


def _check_pool_keys(base: Recipe, recipes: list[Recipe]) -> None:
    """The keys that name parts of the pool (targets, eval.primary), checked before any run."""
    from curation.data.ingest import read_pool_marker
    from curation.data.sets import resolve_target

    marker = read_pool_marker(base.data)
    for recipe in recipes:
        opts = recipe.method_options
        if hasattr(opts, "target"):
            resolve_target(marker, opts.target, f"{method_options_key(recipe.stages)}.target", recipe.data)
    primary_eval_of(base)


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


def run_all(specs: list[RunSpec], jobs: int, log=print) -> list[str]:
    """Warm-ups first; each seed's method runs start as soon as its warm-up is done. A failed run
    does not stop the others (hours of finished work stay useful); returns one line per failure."""
    if jobs < 1:
        raise MatesError(f"`--jobs` must be >= 1; got {jobs}.")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    warmups = {s.seed: s for s in specs if s.method == WARMUP}
    rank = {m: i for i, m in enumerate(COST_ORDER)}
    todo = sorted((s for s in specs if s.method != WARMUP and not finished(s.recipe)),
                  key=lambda s: (rank.get(split_entry(s.method)[0], 0), s.seed))
    total, done, started, failures = len(todo), 0, time.perf_counter(), []
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
                if future.exception() is not None:  # the others go on; a rerun retries this one
                    failures.append(str(future.exception()))
                    log(f"compare: {failures[-1]}")
                    if spec.method == WARMUP:  # nothing of this seed can start
                        todo[:] = [s for s in todo if s.seed != spec.seed]
                    continue
                seconds = future.result()
                if spec.method == WARMUP:
                    ready.add(spec.seed)
                    log(f"compare: {spec.label} (stage 0) done in {seconds:.0f} s")
                else:
                    done += 1
                    rows = read_parquet(spec.recipe.run, "metrics.parquet").to_pylist()
                    last = max(r["stage"] for r in rows)
                    finals = ", ".join(f"{r['eval_set']} {r['loss']:.4f}" for r in rows if r["stage"] == last)
                    log(f"compare: [{done}/{total}] {spec.label}: final loss {finals} "
                        f"in {seconds:.0f} s ({time.perf_counter() - started:.0f} s elapsed)")
            submit_ready()
    return failures


def compare(recipe_file: str, overrides: dict, methods: list[str], n_seeds: int, out: str, *, jobs: int = 1,
            command: str = "", log=print, run: bool = True, earlier: list[str] = ()) -> str:
    """Run what is missing (`run`), then write the table of every finished run; `earlier`: folders
    of committed comparison tables that fill in the runs this one lacks (`with_earlier`)."""
    if "://" in out:
        raise MatesError(f"`--out` must be a local folder (the runs inside may use any store); got {out!r}.")
    specs = plan(recipe_file, overrides, methods, n_seeds, out)
    failures = run_all(specs, jobs, log=log) if run else []
    runs, metrics = collect(specs)
    stage_tables = collect_stages(specs, metrics)
    if earlier:
        runs, metrics, *stage_tables = with_earlier((runs, metrics, *stage_tables), list(earlier), methods)
    text = write_outputs(os.path.abspath(out), runs, metrics, methods, command, tuple(stage_tables),
                         off_target_sets(specs[0].recipe))
    if failures:  # the table holds the finished runs; the same command retries the rest
        raise MatesError(f"{len(failures)} run(s) failed, the table covers the finished ones; run the same "
                         f"command again to retry them. First: {failures[0]}")
    return text
