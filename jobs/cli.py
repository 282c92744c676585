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
    p.add_argument("out", help="output folder (corpus.jsonl, reference/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-per-source", type=int, default=None, help="cap on each real source")

    p = sub.add_parser("ingest", help="tokenize documents into MDS shards + the sample catalog")
    p.add_argument("--input", required=True, help="JSONL/Parquet/txt file or folder, local or s3://")
    p.add_argument("--data", help="pool URL (default: the recipe's `data`)")
    p.add_argument("--recipe", help="recipe YAML whose tokenizer/ingest sections to use")
    p.add_argument("--reference", help="folder with cloze.jsonl / heldout.jsonl")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--tokenizer", help="a tokenizer.json to load instead of training one")
    p.add_argument("--source", default="text", help="source label for records without one")
    p.add_argument("--force", action="store_true", help="replace an existing pool")

    p = sub.add_parser("run", help="staged pretraining with curation at every stage boundary")
    p.add_argument("recipe", help="recipe YAML (or a name under training/recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set run=s3://bucket/run1")
    p.add_argument("--until-stage", type=int, default=None, metavar="K",
                   help="train stages 0..K only (a later `mates run` goes on from there)")

    p = sub.add_parser("curate", help="run one stage boundary's curation job on its own")
    p.add_argument("--run", required=True, help="run URL (holds recipe.yaml)")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--force", action="store_true", help="recompute a committed stage")

    p = sub.add_parser("query", help="read-only DuckDB SQL over a run's tables (committed stages only)")
    p.add_argument("run", help="run URL (local folder or s3://)")
    p.add_argument("sql", help="one SQL statement; views: samples, probes, trajectories, scores, "
                               "selection, stages, metrics")
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
    p.add_argument("--methods", default="random,perplexity,dsir,classifier,mates,group_mates")
    p.add_argument("--seeds", type=int, default=3, help="seeds recipe.seed, recipe.seed+1, ...")
    p.add_argument("--out", default="compare-out", help="local folder for runs, logs and the table")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores/jobs threads)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")

    p = sub.add_parser("report", help="an HTML report with plots of a run or of a comparison")
    p.add_argument("source", help="a run URL, or a `mates compare` output folder")
    p.add_argument("--out", default=None, help="report folder (default: <source>/report, local only)")

    p = sub.add_parser("bench", help="benchmarks (never run as timed tests)")
    p.add_argument("what", choices=["ingest", "ingest-memory", "train", "probe", "score", "select"])
    p.add_argument("--recipe", default="demo")
    p.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--batches", type=int, default=None, help="train: batches per measured run (default 100)")
    return parser


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise MatesError(f"`--set` takes KEY=VALUE; got {pair!r}.")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
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
