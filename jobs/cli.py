"""The `mates` command line: thin wrappers over curation/ and training/.

Every user error is a `MatesError`: printed as one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from schemas.errors import MatesError

# Loading the stack (torch, transformers) is slow: each command imports what it needs lazily.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def _commands():
    from jobs import commands

    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mates", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-corpus", help="build the mixed-quality demo corpus from packaged text")
    p.add_argument("out", help="output folder (corpus.jsonl, targets/, eval/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-per-source", type=int, default=None, help="cap on each real source")

    p = sub.add_parser("ingest", help="tokenize documents into MDS shards + the sample catalog")
    p.add_argument("--input", required=True, help="JSONL/Parquet/txt file or folder, local or s3://")
    p.add_argument("--data", help="pool URL (default: the recipe's `data`)")
    p.add_argument("--recipe", help="recipe YAML whose tokenizer/ingest sections to use")
    p.add_argument("--target", action="append", default=[], metavar="NAME=FILE",
                   help="a set curation aims at (JSONL: `text` for lm, `context` + `target` for cloze); repeatable")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                   help="an evaluation set (same format), disjoint from the pool and every target; repeatable")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--shard-size-limit", type=int, metavar="BYTES",
                   help="bytes per pool shard (`ingest.shard_size_limit`; default 64 MiB)")
    p.add_argument("--tokenizer", help="any Hugging Face tokenizer.json (file or folder) to load instead of training "
                                       "one; over 65,536 entries the pool stores uint32 tokens")
    p.add_argument("--source", default="text", help="source label for records without one")
    p.add_argument("--force", action="store_true", help="replace an existing pool")

    p = sub.add_parser("run", help="staged pretraining with curation at every stage boundary")
    p.add_argument("recipe", help="recipe YAML (or a name under training/recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set run=s3://bucket/run1")
    p.add_argument("--until-stage", type=int, default=None, metavar="K",
                   help="train stages 0..K only (a later `mates run` goes on from there)")

    p = sub.add_parser("embed", help="embed a pool with the frozen encoder ahead of time (backbone: frozen)")
    p.add_argument("--recipe", required=True, help="recipe whose encoder settings to use (name or YAML)")
    p.add_argument("--data", help="pool URL (default: the recipe's `data`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--method", default=None, help="options block to take encoder settings from "
                                                  "(default: the recipe's method, else mates)")
    p.add_argument("--touched", action="store_true", help="only the candidates of the recipe's curated stages")
    p.add_argument("--limit", type=int, default=None, help="only the first N of those sample ids")
    p.add_argument("--part-size", type=int, default=None, help="samples per stored part (default 2048)")

    p = sub.add_parser("curate", help="run one stage boundary's curation job on its own")
    p.add_argument("--run", required=True, help="run URL (holds recipe.yaml)")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--force", action="store_true", help="recompute a committed stage")

    p = sub.add_parser("audit-oracle", help="the one-step oracle per catalog group, per target and probe method")
    p.add_argument("--run", required=True, help="run URL (holds recipe.yaml and the stage state)")
    p.add_argument("--stage", type=int, default=0, help="probe the state at the end of this stage")
    p.add_argument("--targets", default="wiki_en", help="comma-separated target sets of the pool")
    p.add_argument("--methods", default="forward=40,first_order=40,preconditioned=40,exact=16",
                   help="METHOD=PROBES_PER_GROUP, comma-separated (probes are shared: smaller N = a prefix)")
    p.add_argument("--grad-clip-norm", type=float, default=None,
                   help="the probe state's clip norm for every method (0: off; default: the run's)")
    p.add_argument("--group-by", default="source", help="catalog column to stratify and group by")
    p.add_argument("--max-target", type=int, default=64, help="target examples L_ref is measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here")

    p = sub.add_parser("query", help="read-only DuckDB SQL over a run's tables (committed stages only)")
    p.add_argument("run", help="run URL (local folder or s3://)")
    p.add_argument("sql", help="one SQL statement; views: samples, embeddings, probes, trajectories, scores, "
                               "selection, audit, stages, metrics")
    p.add_argument("--data", help="pool URL (default: the run recipe's `data`)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", metavar="FILE", help="write the result as CSV ('-' = stdout)")
    fmt.add_argument("--parquet", metavar="FILE", help="write the result as Parquet")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown in the table view")

    p = sub.add_parser("demo", help="demo corpus -> ingest -> the demo recipe, end to end")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--recipe", default="demo")

    p = sub.add_parser("compare", help="the recipe once per method and seed, same budget; one table")
    p.add_argument("recipe", help="recipe YAML (or a packaged name, e.g. bench)")
    p.add_argument("--methods", default="random,perplexity,dsir,classifier,mates,group_mates",
                   help="comparison entries: method names, or mates@frozen / group_mates@frozen / "
                        "mates@oracle / mates@ngram (that backbone), or a group_mates entry + "
                        "-no-interaction (its greedy without the relational term)")
    p.add_argument("--seeds", type=int, default=3, help="seeds recipe.seed, recipe.seed+1, ...")
    p.add_argument("--out", default="compare-out", help="local folder for runs, logs and the table")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores/jobs threads)")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: the table of the runs finished so far (a comparison still running)")
    p.add_argument("--from", dest="earlier", action="append", default=[], metavar="FOLDER",
                   help="an earlier comparison's folder of tables (runs/metrics/stages/audits.parquet): "
                        "the runs this one has not finished are taken from there; repeatable")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")

    p = sub.add_parser("report", help="an HTML report with plots of a run or of a comparison")
    p.add_argument("source", help="a run URL, or a `mates compare` output folder")
    p.add_argument("--out", default=None, help="report folder (default: <source>/report, local only)")

    p = sub.add_parser("bench", help="benchmarks (never run as timed tests)")
    p.add_argument("what", choices=["ingest", "ingest-memory", "train", "probe", "probe-memory", "score", "select",
                                    "backbones", "bounds", "projection", "scale"])
    p.add_argument("--recipe", default="demo")
    p.add_argument("--run", help="backbones: a mates / group_mates run whose probes both backbones fit")
    p.add_argument("--stage", type=int, default=1, help="backbones: the committed stage whose probes to use")
    p.add_argument("--out", default=None, help="scratch folder (default: a temporary one); scale: the JSON "
                                               "(default training/results/bench/scale.json)")
    p.add_argument("--batches", type=int, default=None, help="train: batches per measured run (default 100)")
    p.add_argument("--rows", default=None, metavar="N,N,...",
                   help="select: pool sizes, each in its own process (default 100000,1000000,5000000)")
    p.add_argument("--sizes", default="1e5,1e6,1e7", metavar="N,N,...", help="scale: synthetic pool sizes")
    p.add_argument("--candidates", default="1e5", help="scale: candidates of each boundary")
    p.add_argument("--methods", default="mates@frozen,group_mates@frozen", help="scale: one boundary of each")
    p.add_argument("--candidates-mode", default="shards", choices=["auto", "samples", "shards"],
                   help="scale: `stages.candidates` of the boundaries (README \"Locality\")")
    p.add_argument("--dir", default=None, help="scale: scratch folder on local disk, kept and reused across runs "
                                               "(default /tmp/mates-bench-scale; ~15 GB at 10^7)")
    return parser


def _overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs -> {dotted key: value}; keys are checked names, values bounded YAML."""
    from schemas import bounds

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise MatesError(f"`--set` takes KEY=VALUE; got {pair[:80]!r}.")
        key, value = pair.split("=", 1)
        for part in key.split("."):
            bounds.check_name(part, f"--set {key[:80]}", bounds.KEY)
        if len(value) > bounds.MAX_SET_VALUE_CHARS:
            raise MatesError(f"`--set {key}` value is {len(value):,} characters; the bound is "
                             f"{bounds.MAX_SET_VALUE_CHARS:,}.")
        out[key] = bounds.load_yaml(value, f"--set {key}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = _commands()
        handler = getattr(commands, "cmd_" + args.command.replace("-", "_"))
        if hasattr(args, "set"):
            args.set = _overrides(args.set)
        return handler(args) or 0
    except MatesError as exc:
        print(f"mates: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mates: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
