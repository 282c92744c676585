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
    """A moto S3 server on 127.0.0.1 with one bucket; yields its s3:// URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        server.stop()


def _demo_corpus(out: str, seed: int, max_per_source=None) -> str:
    from curation.data.demo_corpus import DemoCorpusConfig, write_demo_corpus

    corpus = os.path.join(out, "corpus")
    if not os.path.exists(os.path.join(corpus, "corpus.jsonl")):
        write_demo_corpus(corpus, DemoCorpusConfig(seed=seed, max_per_source=max_per_source))
    return corpus


def bench_ingest(recipe, *, out=None, log=print) -> dict:
    """Whole-pipeline ingest tokens/s next to the bare tokenizer on the same texts, same run."""
    from curation.data.ingest import ingest
    from curation.data.readers import read_documents
    from curation.data.tokenizer import load_pool_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out = out or tmp
        corpus = _demo_corpus(out, recipe.seed)
        data = os.path.join(out, "bench-ingest-data")
        summary = ingest(os.path.join(corpus, "corpus.jsonl"), data, cfg=recipe.ingest,
                         tokenizer_cfg=recipe.tokenizer, force=True)
        tok = load_pool_tokenizer(data)
        texts = [d["text"] for d in read_documents(os.path.join(corpus, "corpus.jsonl"))]
        t0 = time.perf_counter()
        n_tokens = sum(len(e.ids) + 1 for i in range(0, len(texts), recipe.ingest.batch_docs)
                       for e in tok.encode_batch(texts[i:i + recipe.ingest.batch_docs]))
        bare = time.perf_counter() - t0
    result = {"documents": summary.documents, "tokens_stored": summary.tokens,
              "ingest_seconds": round(summary.seconds, 2), "ingest_tokens_per_s": round(summary.tokens_per_s),
              "bare_tokenizer_seconds": round(bare, 2), "bare_tokenizer_tokens_per_s": round(n_tokens / bare),
              "note": "ingest includes tokenizer training, slicing, MDS + catalog writing and upload"}
    result["ratio_ingest_to_bare"] = round(result["ingest_tokens_per_s"] / result["bare_tokenizer_tokens_per_s"], 3)
    return result


def bench_train(recipe, *, out=None, log=print, batches: int = 100) -> dict:
    """Training tokens/s streaming a stage index from S3 vs the same samples as in-memory tensors."""
    from curation.data.demo_corpus import demo_set_files
    from curation.data.ingest import ingest
    from curation.pool import MDSFolder
    from schemas.recipe import recipe_from_dict
    from training import stage_loop

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
        streamed = stage_loop.train_stage(ctx, 0)
        sel = read_parquet(join(bench_recipe.run, "stages", "0"), "selection.parquet")
        ids = sel.filter(sel.column("selected")).column("sample_id").to_pylist()
        pool = MDSFolder(join(bench_recipe.data, "pool"))
        samples = [pool[i] for i in ids]
        in_memory = stage_loop.train_stage(ctx, 0, in_memory=samples)
    result = {"batches": batches, "batch_size": recipe.train_loader.batch_size,
              "model": f"{recipe.model.name} d={recipe.model.d_model} L={recipe.model.n_layers} seq={recipe.ingest.seq_len}",
              "streaming_s3_tokens_per_s": round(streamed["tokens_per_s"]),
              "in_memory_tokens_per_s": round(in_memory["tokens_per_s"])}
    result["ratio"] = round(result["streaming_s3_tokens_per_s"] / result["in_memory_tokens_per_s"], 3)
    return result


def bench_probe(recipe, *, out=None, log=print, n_probes: int = 64, n_reference: int = 64) -> dict:
    """probes/s of exact and first_order next to the slow baseline, same samples, same run.

    The model has the recipe's sizes and AdamW moments from a few steps; reference and probes are
    random token sequences of the recipe's length (speed does not depend on which tokens).
    """
    import torch

    from curation.probe_bench import bench_probe as run, toy_probe_state, toy_reference, toy_samples

    m, seq = recipe.model, recipe.ingest.seq_len
    vocab = recipe.tokenizer.vocab_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"bench probe: {m.name} d={m.d_model} L={m.n_layers} seq={seq} vocab={vocab}, "
        f"{n_reference} reference sequences, {n_probes} probes on {device}")
    state = toy_probe_state(m, vocab)
    reference = toy_reference(n_reference, seq, vocab)
    samples = toy_samples(n_probes, vocab, min_len=seq // 2, max_len=seq)
    return run(state, reference, samples, pad_id=0, device=device, probe_batch=16)


def bench_score(recipe, *, out=None, log=print, n_samples: int = 512) -> dict:
    """Pool-scoring samples/s (MDS -> text -> MiniLM -> score) next to the bare encoder forward."""
    import numpy as np
    import torch

    from curation.data.ingest import ingest
    from curation.data.tokenizer import load_pool_tokenizer
    from curation.influence_model import InfluenceModel
    from curation.scoring import bench_score as run
    from schemas.recipe import MatesOptions

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


def bench_select(recipe, *, out=None, log=print, n_rows: int = 1_000_000) -> dict:
    """Clustering + DuckDB quotas + greedy group selection on synthetic scored rows."""
    from jobs.bench_select import bench_select as run

    log(f"bench select: {n_rows:,} synthetic rows with 384-d embeddings")
    return run(n_rows=n_rows)


def dump(result: dict) -> str:
    return json.dumps(result, indent=2)
