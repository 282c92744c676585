"""`mates bench ...`: measurements that are too long for tests. Each returns a dict of figures.

Benchmarks that need S3 start moto's server on 127.0.0.1 (a free port) in this process, exactly
as the tests do; they never reach any other address.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time

from schemas.storage import join, read_parquet


@contextlib.contextmanager
def loopback_s3(bucket: str):
    """A moto S3 server on 127.0.0.1 with one bucket, in its own process; yields its s3:// URL.

    Its own process, as a real object store is: served from threads of this process, every
    shard download would compete for the GIL with the training loop being measured.
    """
    import subprocess
    import sys

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(600):  # the server imports moto first: wait until it answers
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        server.terminate()
        server.wait()


def _demo_corpus(out: str, seed: int, max_per_source=None) -> str:
    from curation.data.demo_corpus import DemoCorpusConfig, write_demo_corpus

    corpus = os.path.join(out, "corpus")
    if not os.path.exists(os.path.join(corpus, "corpus.jsonl")):
        write_demo_corpus(corpus, DemoCorpusConfig(seed=seed, max_per_source=max_per_source))
    return corpus


def bench_ingest(recipe, *, out=None, log=print) -> dict:
    """Ingest tokens/s with 1 and 2 ranks (launcher) next to the bare tokenizer; see bench_ingest.py."""
    from jobs.bench_ingest import bench_ingest as run

    with tempfile.TemporaryDirectory() as tmp:
        out = out or tmp
        return run(recipe, out=out, log=log, corpus_dir=_demo_corpus(out, recipe.seed))


def bench_ingest_memory(recipe, *, out=None, log=print) -> dict:
    """Peak RSS of the ingest of one >= 200 MB (uncompressed) `.jsonl.gz`; see bench_ingest.py."""
    from jobs.bench_ingest import bench_ingest_memory as run

    out = out or os.path.join(tempfile.gettempdir(), "mates-bench-ingest-memory")
    return run(recipe, out=out, log=log, corpus_dir=_demo_corpus(out, recipe.seed))


def bench_train(recipe, *, out=None, log=print, batches: int = 100, repeats: int = 2) -> dict:
    """Training tokens/s streaming a stage index from S3 vs the same samples as in-memory tensors.

    How it measures. The S3 server runs in its own process; every streamed run starts from an
    empty local cache (each shard is downloaded during the run, as on a fresh node); the runs
    go in A B B A order (`repeats` pairs) so that warm-up and drift of a shared machine fall on
    both sides; the ratio is of the summed tokens over the summed seconds of each side.
    """
    from curation.data.demo_corpus import demo_set_files
    from curation.data.ingest import ingest
    from curation.store.pool import MDSFolder
    from schemas.recipe import recipe_from_dict
    from training import data as train_data
    from training import stage_loop, trainer_parts

    with tempfile.TemporaryDirectory() as tmp, loopback_s3("mates-bench") as bucket:
        corpus = _demo_corpus(out or tmp, recipe.seed, max_per_source=1500)
        raw = recipe.to_dict() | {"data": join(bucket, "data"), "run": join(bucket, "run")}
        raw["stages"] = raw["stages"] | {"count": 1, "batches": [batches], "method": "random"}
        raw["save_folder"] = None
        bench_recipe = recipe_from_dict(raw)
        targets, evals = demo_set_files(corpus)
        ingest(os.path.join(corpus, "corpus.jsonl"), bench_recipe.data, cfg=bench_recipe.ingest,
               tokenizer_cfg=bench_recipe.tokenizer, targets=targets, evals=evals)
        ctx = stage_loop.RunContext(bench_recipe, log)
        stage_loop.curate_if_needed(ctx, 0)
        sel = read_parquet(join(bench_recipe.run, "stages", "0"), "selection.parquet")
        ids = sel.filter(sel.column("selected")).column("sample_id").to_pylist()
        pool = MDSFolder(join(bench_recipe.data, "pool"))
        samples = [pool[i] for i in ids]
        runs = {"streaming_s3": [], "in_memory": []}
        order = ["streaming_s3", "in_memory", "in_memory", "streaming_s3"] * (repeats // 2) + \
            ["streaming_s3", "in_memory"] * (repeats % 2)
        for k, mode in enumerate(order):
            train_data.CACHE_ROOT = os.path.join(tmp, f"cache-{k}")  # a cold cache per streamed run
            trained = stage_loop.train_stage(ctx, 0, in_memory=samples if mode == "in_memory" else None)
            runs[mode].append((trained["tokens_per_s"] * trained["seconds"], trained["seconds"]))
            trainer_parts.release(trained.pop("trainer"))
            log(f"bench train: run {k} {mode}: {trained['tokens_per_s']:,.0f} tokens/s")
    figure = {mode: sum(t for t, _ in r) / sum(s for _, s in r) for mode, r in runs.items()}
    result = {"batches": batches, "batch_size": recipe.train_loader.batch_size, "runs_per_mode": len(runs["in_memory"]),
              "model": f"{recipe.model.name} d={recipe.model.d_model} L={recipe.model.n_layers} seq={recipe.ingest.seq_len}",
              "streaming_s3_tokens_per_s": round(figure["streaming_s3"]),
              "in_memory_tokens_per_s": round(figure["in_memory"]),
              "each_run_tokens_per_s": {m: [round(t / s) for t, s in r] for m, r in runs.items()},
              "load_average_1min": round(os.getloadavg()[0], 2)}
    result["ratio"] = round(figure["streaming_s3"] / figure["in_memory"], 3)
    return result


def bench_probe(recipe, *, out=None, log=print, n_probes: int = 64, n_reference: int = 64) -> dict:
    """probes/s of exact and first_order next to the slow baseline, same samples, same run.

    The model has the recipe's sizes and AdamW moments from a few steps; reference and probes are
    random token sequences of the recipe's length (speed does not depend on which tokens).
    """
    import torch

    from jobs.bench_probe import bench_probe as run, toy_probe_state, toy_reference, toy_samples

    m, seq = recipe.model, recipe.ingest.seq_len
    vocab = recipe.tokenizer.vocab_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"bench probe: {m.name} d={m.d_model} L={m.n_layers} seq={seq} vocab={vocab}, "
        f"{n_reference} reference sequences, {n_probes} probes on {device}")
    state = toy_probe_state(m, vocab)
    reference = toy_reference(n_reference, seq, vocab)
    samples = toy_samples(n_probes, vocab, min_len=seq // 2, max_len=seq)
    out = run(state, reference, samples, pad_id=0, device=device, probe_batch=16)
    # forward-only probes (bench_oracle.py): accuracy per derivative mode and dtype, and probes/s over
    # training samples/s on full-length batches of 16 (the same model, batch and length)
    from curation.lm.batching import collate_samples
    from jobs.bench_oracle import forward_figures

    full = toy_samples(n_probes, vocab, min_len=seq, max_len=seq, seed=3)
    batches = [collate_samples(full[i:i + 16], 0, length=seq) for i in range(0, n_probes, 16)]
    return out | forward_figures(state, reference, batches, device=device)


def bench_probe_memory(recipe, *, out=None, log=print) -> dict:
    """Peak RSS at GPT-2-small size (124M, seq 512, probe_batch 16): an inference forward, forward
    probes (central, jvp) and first_order, each in its own subprocess; see bench_oracle.py."""
    from jobs.bench_oracle import probe_memory

    log("bench probe-memory: GPT-2 small (d768 x 12 layers, vocab 50257), seq 512, batch 16; "
        "one subprocess per method, capped at 14 GB of address space")
    return probe_memory(log=log)


def bench_score(recipe, *, out=None, log=print, n_samples: int = 512) -> dict:
    """Pool-scoring samples/s (MDS -> text -> MiniLM -> score) next to the bare encoder forward."""
    import numpy as np
    import torch

    from curation.data.ingest import ingest
    from curation.data.tokenizer import load_pool_tokenizer
    from curation.influence.finetuned import InfluenceModel
    from jobs.bench_score import bench_score as run
    from schemas.method_options import MatesOptions

    # the recipe's encoder settings when its method has them (mates, group_mates), else defaults
    opts = recipe.method_options if isinstance(recipe.method_options, MatesOptions) else MatesOptions()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _demo_corpus(out or tmp, recipe.seed, max_per_source=300)
        data = os.path.join(out or tmp, "bench-score-data")
        ingest(os.path.join(corpus, "corpus.jsonl"), data, cfg=recipe.ingest, tokenizer_cfg=recipe.tokenizer,
               force=True)
        model = InfluenceModel(layers_kept=opts.encoder_layers, max_len=opts.encoder_max_len)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log(f"bench score: MiniLM {opts.encoder_layers} layers, max_len {opts.encoder_max_len}, "
            f"{n_samples} samples on {device}")
        return run(model, os.path.join(data, "pool"), np.arange(n_samples), load_pool_tokenizer(data),
                   batch_size=opts.batch_size * 4, device=device)


def bench_select(recipe, *, out=None, log=print, sizes=None) -> dict:
    """Clustering + DuckDB quotas + greedy group selection on synthetic fp16 rows (384-d), each
    size in its own process; figures to training/results/bench/select_scale.json (or `out`)."""
    from jobs.bench_select_scale import RESULT, SIZES, bench_select_scale

    sizes = sizes or SIZES
    log(f"bench select: {', '.join(f'{n:,}' for n in sizes)} synthetic fp16 rows with 384-d embeddings")
    return bench_select_scale(sizes, out=os.path.join(out, "select_scale.json") if out else RESULT, log=log)


def dump(result: dict) -> str:
    return json.dumps(result, indent=2)
