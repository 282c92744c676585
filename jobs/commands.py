"""Command handlers: each turns parsed arguments into plain values and calls curation/training."""
from __future__ import annotations

import json
import os
import sys
import time

from schemas.errors import MatesError

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "recipes")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def recipe_path(name_or_path: str) -> str:
    """A recipe file path, or the name of a packaged recipe (`micro`, `demo`, `bench`)."""
    if os.path.exists(name_or_path):
        return name_or_path
    packaged = os.path.join(RECIPES_DIR, f"{name_or_path}.yaml")
    if os.path.exists(packaged):
        return packaged
    names = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))
    raise MatesError(f"`recipe` {name_or_path!r} is neither a file nor a packaged recipe ({', '.join(names)}).")


def load(name_or_path: str, overrides: dict | None = None):
    from schemas.recipe import load_recipe

    return load_recipe(recipe_path(name_or_path), overrides)


# ---------------------------------------------------------------- demo-corpus / ingest
def cmd_demo_corpus(args) -> int:
    from curation.data.demo_corpus import DemoCorpusConfig, write_demo_corpus

    summary = write_demo_corpus(args.out, DemoCorpusConfig(seed=args.seed, max_per_source=args.max_per_source))
    log(f"demo corpus: {summary['documents']} documents in {args.out}/corpus.jsonl; "
        f"targets {summary['targets']}, eval sets {summary['eval']}")
    for source, n in sorted(summary["sources"].items()):
        log(f"  {source:12s} {n:7d}")
    return 0


def print_ingest_summary(summary) -> None:
    d = summary.to_dict()
    log(f"ingest: {d['documents']} documents -> {d['sequences']} sequences, {d['tokens']} tokens "
        f"in {d['shards']} shards ({d['bytes_written'] / 1e6:.1f} MB), {d['seconds']:.1f} s, "
        f"{d['tokens_per_s']:,.0f} tokens/s; {d['dropped_short']} short slices dropped")
    for source, n in sorted(d["per_source"].items()):
        log(f"  {source:12s} {n:7d} sequences")


def run_ingest(input_url: str, data_url: str, recipe, *, targets=None, evals=None, source="text", force=False):
    """Ingest on every rank of the launcher (`composer -n N -m jobs.cli ingest ...`), or alone."""
    from tqdm import tqdm

    from curation.data.ingest import ingest
    from curation.data.ranks import Ranks

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the ranks exchange small objects only (counts, indexes)
        from training import dist_utils

        dist_utils.init(recipe.device, timeout_s=recipe.dist_timeout_s)
        ranks = dist_utils.ranks()
    else:  # one process: no Composer import, so bad input is refused in about a second
        ranks = Ranks()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1:  # the tokenizer's thread pool (rayon) takes every core in each rank otherwise
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_world)))
    bar = tqdm(unit="doc", desc="ingest", file=sys.stderr, disable=not sys.stderr.isatty() or ranks.rank > 0)

    def progress(n_docs, summary):
        bar.update(n_docs)
        bar.set_postfix(tokens=summary.tokens)

    try:
        summary = ingest(input_url, data_url, cfg=recipe.ingest, tokenizer_cfg=recipe.tokenizer,
                         targets=targets, evals=evals, default_source=source, force=force, progress=progress,
                         ranks=ranks)
    finally:
        bar.close()
    if ranks.rank == 0:
        print_ingest_summary(summary)
    return summary


def cmd_ingest(args) -> int:
    from curation.data.sets import parse_named_files
    from schemas.recipe import recipe_from_dict

    overrides = {}
    if args.seq_len:
        overrides["ingest.seq_len"] = args.seq_len
        overrides["model.max_seq_len"] = max(args.seq_len, 128)
    if args.vocab_size:
        overrides["tokenizer.vocab_size"] = args.vocab_size
    if args.tokenizer:
        overrides["tokenizer.path"] = args.tokenizer
    if args.shard_size_limit is not None:
        overrides["ingest.shard_size_limit"] = args.shard_size_limit
    if args.data:
        overrides["data"] = args.data
    if args.recipe:
        recipe = load(args.recipe, overrides)
    else:
        if not args.data:
            raise MatesError("`--data` is required without `--recipe`.")
        recipe = recipe_from_dict({"data": args.data, "run": args.data}, overrides)
    from schemas import bounds

    bounds.check_url(args.input, "--input")
    targets, evals = parse_named_files(args.target, "--target"), parse_named_files(args.eval, "--eval")
    run_ingest(args.input, recipe.data, recipe, targets=targets, evals=evals, source=args.source, force=args.force)
    return 0


# ---------------------------------------------------------------- run / curate / demo
def cmd_run(args) -> int:
    recipe = load(args.recipe, args.set)  # refused before the stack (torch, Composer) is imported
    from training.stage_loop import run_recipe

    run_recipe(recipe, log=log, until_stage=args.until_stage)
    return 0


def cmd_compare(args) -> int:
    from training.compare import compare, parse_methods

    sets = "".join(f" --set {k}={v}" for k, v in args.set.items())
    earlier = "".join(f" --from {f}" for f in args.earlier)
    command = (f"mates compare {args.recipe} --methods {args.methods} --seeds {args.seeds} "
               f"--jobs {args.jobs} --out {args.out}{sets}{earlier}{' --table-only' if args.table_only else ''}")
    text = compare(recipe_path(args.recipe), args.set, parse_methods(args.methods), args.seeds, args.out,
                   jobs=args.jobs, command=command, log=log, run=not args.table_only, earlier=args.earlier)
    print(text)
    return 0


def cmd_report(args) -> int:
    from training.report import write_report

    path = write_report(args.source, args.out, log=log)
    log(f"report: {path}")
    return 0


def cmd_embed(args) -> int:
    from jobs.embed import embed_pool

    overrides = dict(args.set)
    if args.data:
        overrides["data"] = args.data
    result = embed_pool(load(args.recipe, overrides), method=args.method, touched=args.touched,
                        limit=args.limit, part_size=args.part_size, log=log)
    print(json.dumps(result))
    return 0


def cmd_curate(args) -> int:
    from training.stage_loop import curate_stage

    from schemas.bounds import check_url

    curate_stage(check_url(args.run, "--run"), args.stage, force=args.force, log=log)
    return 0


def cmd_demo(args) -> int:
    """demo corpus -> ingest -> the demo recipe, all under `args.out`."""
    from curation.data.demo_corpus import DemoCorpusConfig, demo_set_files, write_demo_corpus
    from schemas.storage import store_for
    from training.stage_loop import run_recipe

    out = os.path.abspath(args.out)
    corpus_dir, data_url, run_url = (os.path.join(out, p) for p in ("corpus", "data", "run"))
    recipe = load(args.recipe, {"data": data_url, "run": run_url})
    started = time.perf_counter()
    if not os.path.exists(os.path.join(corpus_dir, "corpus.jsonl")):
        summary = write_demo_corpus(corpus_dir, DemoCorpusConfig(seed=recipe.seed))
        log(f"demo corpus: {summary['documents']} documents, sources {summary['sources']}")
    if store_for(data_url).exists("_SUCCESS"):
        log(f"ingest: pool at {data_url} already committed; reusing it")
    else:
        targets, evals = demo_set_files(corpus_dir)
        run_ingest(os.path.join(corpus_dir, "corpus.jsonl"), data_url, recipe, targets=targets, evals=evals)
    run_recipe(recipe, log=log)
    from training.report import write_report

    page = write_report(run_url, os.path.join(out, "report"), log=lambda message: None)
    log(f"demo: finished in {time.perf_counter() - started:.0f} s; outputs under {out}")
    log(f"demo: report of the run (plots of loss, source mix, influence): {page}")
    log(f"demo: next, query it: mates query {run_url} \"SELECT * FROM metrics\"")
    return 0


def cmd_audit_oracle(args) -> int:
    """The one-step oracle per catalog group, for each target x probe method, on a run's state."""
    from curation.lm.batching import ReferenceSet
    from curation.data.sets import TARGETS, load_set, resolve_target
    from curation.data.ingest import read_pool_marker
    from curation.data.tokenizer import EOS, load_pool_tokenizer
    from curation.oracle.audit import audit_markdown, oracle_audit
    from schemas.probe_state import load_probe_state
    from schemas.storage import store_for
    from training.dist_utils import device_name
    from training.stage_loop import state_name

    if args.grad_clip_norm is not None and not args.grad_clip_norm >= 0:
        raise MatesError(f"`--grad-clip-norm` must be >= 0 (0 turns clipping off); got {args.grad_clip_norm}.")
    store = store_for(args.run)
    if not store.exists("recipe.yaml"):
        raise MatesError(f"`--run` {args.run!r} holds no recipe.yaml; start it with `mates run`.")
    from schemas.recipe import load_recipe

    recipe = load_recipe(store.read_bytes("recipe.yaml").decode(), {"run": args.run})
    marker = read_pool_marker(recipe.data)
    pad = load_pool_tokenizer(recipe.data).token_to_id(EOS)
    names = [resolve_target(marker, n, "--targets", recipe.data) for n in args.targets.split(",")]
    targets = {n: ReferenceSet(load_set(recipe.data, TARGETS, n), pad, 16, args.max_target) for n in names}
    per_group = {}
    for item in args.methods.split(","):
        method, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 2:
            raise MatesError(f"`--methods` takes METHOD=N_PER_GROUP (N >= 2), comma-separated; got {item!r}.")
        per_group[method] = int(n)
    if not store_for(recipe.checkpoint_url).exists(state_name(args.stage)):
        raise MatesError(f"`--stage` {args.stage}: {recipe.checkpoint_url} holds no {state_name(args.stage)}.")
    state = load_probe_state(recipe.checkpoint_url, state_name(args.stage))
    if args.grad_clip_norm is not None:  # e.g. 0: compare forward (which never sees the clip) like for like
        state["hparams"]["grad_clip_norm"] = float(args.grad_clip_norm)
    log(f"audit-oracle: state after stage {args.stage} of {args.run}; targets {names}; probes per group {per_group}; "
        f"grad clip norm {state['hparams'].get('grad_clip_norm', 0.0)}")
    result = oracle_audit(state, recipe.data, targets=targets, per_group=per_group, group_by=args.group_by,
                          seed=args.seed, pad_id=pad, device=device_name(recipe.device), log=log)
    text = audit_markdown(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"run": args.run, "stage": args.stage, "command": " ".join(sys.argv), **result}, handle, indent=2)
    print(text)
    return 0


# ---------------------------------------------------------------- query
def format_table(table, max_rows: int = 40) -> str:
    """A plain aligned text table of an Arrow table (first `max_rows` rows)."""
    names = table.column_names
    rows = table.slice(0, max_rows).to_pylist()

    def cell(v):
        return f"{v:.6g}" if isinstance(v, float) else ("NULL" if v is None else str(v))

    cells = [[cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more rows ({table.num_rows} in all)")
    return "\n".join(lines)


def cmd_query(args) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from curation.store.run_views import query

    from schemas.bounds import check_url

    table = query(check_url(args.run, "run"), args.sql, args.data and check_url(args.data, "--data"))
    if table is None:
        return 0
    if args.parquet:
        pq.write_table(table, args.parquet)
    elif args.csv:
        pacsv.write_csv(table, sys.stdout.buffer if args.csv == "-" else args.csv)
    else:
        print(format_table(table, args.max_rows))
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from jobs import bench

    if args.what == "backbones":
        from jobs.bench_backbones import bench_backbones

        if not args.run:
            raise MatesError("`--run` is required for `mates bench backbones`.")
        print(json.dumps(bench_backbones(args.run, args.stage, log=log), indent=2))
        return 0
    if args.what == "bounds":  # needs no recipe: the hostile inputs are its own
        from jobs.bench_bounds import bench_bounds

        print(json.dumps(bench_bounds(out=args.out, log=log), indent=2))
        return 0
    if args.what == "projection":  # arithmetic on meta-device shapes: no recipe, nothing trained
        from jobs.bench_projection import bench_projection

        bench_projection(out=args.out and os.path.join(args.out, "projection.json"), log=log)
        return 0
    if args.what == "scale":  # its own synthetic data: no recipe
        from jobs.bench_scale import RESULT, bench_scale, parse_count, parse_methods

        sizes = [parse_count(n, "--sizes") for n in args.sizes.split(",")]
        print(json.dumps(bench_scale(sizes, parse_count(args.candidates, "--candidates"), parse_methods(args.methods),
                                     scratch=args.dir, out=args.out or RESULT, candidates_mode=args.candidates_mode,
                                     log=log)["verdicts"], indent=2))
        return 0
    extra = {"batches": args.batches} if args.batches and args.what == "train" else {}
    if args.rows and args.what == "select":
        sizes = args.rows.split(",")
        if not all(n.isdigit() and int(n) >= 100 for n in sizes):
            raise MatesError(f"`--rows` must be pool sizes >= 100 separated by commas; got {args.rows!r}.")
        extra = {"sizes": [int(n) for n in sizes]}
    result = getattr(bench, f"bench_{args.what.replace('-', '_')}")(load(args.recipe), out=args.out, log=log, **extra)
    print(json.dumps(result, indent=2))
    return 0
