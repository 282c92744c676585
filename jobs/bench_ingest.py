"""`mates bench ingest` and `mates bench ingest-memory`: ingest throughput and memory.

Both run `mates ingest` as a user does, under the Composer launcher, in child processes: tokens/s
is the ingest's own figure from `_SUCCESS` (from the start of `ingest()` to its commit, BPE training
included; process start-up and imports are not), and peak RSS is the child's, measured by the OS.
The bare tokenizer runs in this process on the same texts with the same batches and threads.
"""
from __future__ import annotations

import gzip
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def split_corpus(corpus_jsonl: str, out_dir: str, n_files: int, suffix: str = ".jsonl",
                 repeat: int = 1) -> str:
    """The corpus as `n_files` files (a bucket of parts, as C4 / FineWeb ship), `repeat` times over."""
    if os.path.exists(os.path.join(out_dir, "_done")):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(corpus_jsonl, "rb") as handle:
        lines = handle.readlines()
    opener = gzip.open if suffix.endswith(".gz") else open
    handles = [opener(os.path.join(out_dir, f"part-{i:03d}{suffix}"), "wb") for i in range(n_files)]
    for r in range(repeat):
        for k, line in enumerate(lines):
            record = json.loads(line)
            if repeat > 1:  # distinct ids per copy, as distinct documents would have
                record["id"] = f"{record.get('id', k)}#{r}"
            handles[k % n_files].write(json.dumps(record).encode() + b"\n")
    for handle in handles:
        handle.close()
    open(os.path.join(out_dir, "_done"), "w").close()
    return out_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_ingest(n_ranks: int, input_url: str, data: str, recipe_file: str, log) -> dict:
    """`composer -n N -m jobs.cli ingest ...`; returns the pool's summary and the children's peak RSS."""
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    cmd = [composer, "-n", str(n_ranks), "--master_port", str(free_port()), "-m", "jobs.cli", "ingest",
           "--input", input_url, "--data", data, "--recipe", recipe_file, "--force"]
    log(f"bench ingest: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"ingest with {n_ranks} ranks failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(data, "_SUCCESS")) as handle:
        summary = json.load(handle)["summary"]
    # ru_maxrss of the children is the largest of the launcher and its ranks (kilobytes on Linux)
    summary["peak_rss_mb_largest_process"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    summary["process_wall_seconds"] = round(wall, 1)
    return summary


def _bare_tokenizer(data: str, input_url: str, batch_docs: int) -> tuple[int, float]:
    from curation.data.readers import read_documents
    from curation.data.tokenizer import load_pool_tokenizer

    tok = load_pool_tokenizer(data)
    texts = [d["text"] for d in read_documents(input_url)]
    t0 = time.perf_counter()
    n_tokens = sum(len(e.ids) + 1 for i in range(0, len(texts), batch_docs)
                   for e in tok.encode_batch(texts[i:i + batch_docs]))
    return n_tokens, time.perf_counter() - t0


def _recipe_file(recipe, out: str) -> str:
    from schemas.recipe import dump_recipe

    path = os.path.join(out, "bench-recipe.yaml")
    with open(path, "w") as handle:
        handle.write(dump_recipe(recipe))
    return path


def bench_ingest(recipe, *, out=None, log=print, corpus_dir=None, n_files: int = 8,
                 ranks: tuple[int, ...] = (1, 2)) -> dict:
    """1 rank and 2 ranks next to the bare tokenizer, on the demo corpus cut into `n_files` files."""
    with tempfile.TemporaryDirectory() as tmp:
        out = out or tmp
        split = split_corpus(os.path.join(corpus_dir, "corpus.jsonl"), os.path.join(out, "corpus-split"), n_files)
        recipe_file = _recipe_file(recipe, out)
        runs = {n: _launch_ingest(n, split, os.path.join(out, f"bench-ingest-{n}"), recipe_file, log) for n in ranks}
        n_tokens, bare = _bare_tokenizer(os.path.join(out, f"bench-ingest-{ranks[0]}"), split, recipe.ingest.batch_docs)
    bare_tps = n_tokens / bare
    result = {"documents": runs[ranks[0]]["documents"], "files": n_files, "tokens_stored": runs[ranks[0]]["tokens"],
              "bare_tokenizer_seconds": round(bare, 2), "bare_tokenizer_tokens_per_s": round(bare_tps),
              "cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
              "note": "ingest tokens/s from the start of ingest() to _SUCCESS: BPE training on the "
                      "sample, tokenize, slice, MDS parts, catalog, merge, commit (not process start-up)"}
    for n, s in runs.items():
        result[f"ranks_{n}"] = {"seconds": round(s["seconds"], 2), "tokens_per_s": round(s["tokens_per_s"]),
                                "ratio_to_bare": round(s["tokens_per_s"] / bare_tps, 3),
                                "process_wall_seconds": s["process_wall_seconds"]}
    if len(ranks) > 1:
        result["speedup"] = round(runs[ranks[-1]]["tokens_per_s"] / runs[ranks[0]]["tokens_per_s"], 2)
    return result


def bench_ingest_memory(recipe, *, out=None, log=print, corpus_dir=None, min_mb: int = 200) -> dict:
    """Peak RSS of one ingest of a single `.jsonl.gz` of >= `min_mb` MB uncompressed."""
    out = out or os.path.join(tempfile.gettempdir(), "mates-bench-ingest-memory")
    os.makedirs(out, exist_ok=True)
    corpus_jsonl = os.path.join(corpus_dir, "corpus.jsonl")
    repeat = max(1, -(-min_mb * 1_000_000 // os.path.getsize(corpus_jsonl)))
    folder = split_corpus(corpus_jsonl, os.path.join(out, "big"), 1, suffix=".jsonl.gz", repeat=repeat)
    path = os.path.join(folder, "part-000.jsonl.gz")
    with gzip.open(path, "rb") as handle:  # measure what the ingest will read, once
        uncompressed = sum(len(chunk) for chunk in iter(lambda: handle.read(1 << 24), b""))
    log(f"bench ingest-memory: {path}: {uncompressed / 1e6:.0f} MB uncompressed, "
        f"{os.path.getsize(path) / 1e6:.0f} MB gzip")
    s = _launch_ingest(1, path, os.path.join(out, "data"), _recipe_file(recipe, out), log)
    return {"file": path, "uncompressed_mb": round(uncompressed / 1e6), "gzip_mb": round(os.path.getsize(path) / 1e6),
            "documents": s["documents"], "tokens": s["tokens"], "seconds": round(s["seconds"], 1),
            "tokens_per_s": round(s["tokens_per_s"]), "peak_rss_mb": s["peak_rss_mb_largest_process"],
            "target_peak_rss_mb": 1500}
