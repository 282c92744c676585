"""The GPU device check (issue 23): the gpu recipe on this machine's CUDA devices for a few
hundred steps and one `mates` boundary; prints tokens/s, MFU, peak memory and the boundary's
phases as one JSON object (and a table). Run by jobs/device_check.sh; never by the tests.

What it runs: the demo corpus (packaged text, no network) ingested with the gpu recipe's
tokenizer and seq 1024, then `training/recipes/gpu.yaml` with two stages: `--steps` batches of
random warm-up, a `mates` boundary (first-order probes, the frozen backbone), and a short curated
stage. On one GPU FSDP shards nothing, so `parallelism` is dropped there (plain DDP-free
training); under `composer -n G` with G > 1 the recipe's FSDP block is kept.

MFU = achieved model FLOPs / peak: per token 6 N (N the parameters, the tied embedding once, as
the LM head's matmul) + 12 L s d (attention scores and values, forward and backward), against
the device's dense bf16 peak (a table below, or MATES_PEAK_TFLOPS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops(name: str) -> float | None:
    if os.environ.get("MATES_PEAK_TFLOPS"):
        return float(os.environ["MATES_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="stage 0 batches")
    p.add_argument("--curated-steps", type=int, default=30, help="stage 1 batches, after the boundary")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (sequences of 1024 tokens)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("device check: no CUDA device visible; nothing measured.", file=sys.stderr)
        return 2
    from curation.data.demo_corpus import DemoCorpusConfig, demo_set_files, write_demo_corpus
    from curation.data.ingest import ingest
    from curation.store.stage_index import read_stage_marker
    from schemas.costs import stage_costs
    from schemas.recipe import load_recipe
    from schemas.storage import read_parquet
    from training import dist_utils
    from training.model import build_causal_lm, n_params
    from training.stage_loop import run_recipe

    work = args.out or tempfile.mkdtemp(prefix="mates-device-")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = load_recipe("training/recipes/gpu.yaml", {"data": f"{work}/data", "run": f"{work}/run"})
    t0 = time.perf_counter()
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(f"{work}/data/_SUCCESS"):
        write_demo_corpus(f"{work}/corpus", DemoCorpusConfig(seed=0))
        targets, evals = demo_set_files(f"{work}/corpus")
        ingest(f"{work}/corpus/corpus.jsonl", base.data, cfg=base.ingest, tokenizer_cfg=base.tokenizer,
               targets=targets, evals=evals)
    ingest_seconds = time.perf_counter() - t0
    while not os.path.exists(f"{work}/data/_SUCCESS"):  # other ranks wait for rank 0's pool
        time.sleep(1)
    pool = json.load(open(f"{work}/data/_SUCCESS"))
    per_stage = min(base.stages.pool_per_stage, int(pool["summary"]["sequences"]) // 2)
    overrides = {"data": base.data, "run": base.run, "stages.count": 2,
                 "stages.batches": [args.steps, args.curated_steps], "stages.pool_per_stage": per_stage,
                 "train_loader.batch_size": args.batch_size, "stages.options.mates.n_probes": 512,
                 "loggers.file.filename": f"{work}/logs/{{run_name}}-rank{{rank}}.txt"}
    if world == 1:
        overrides["parallelism"] = {}
    recipe = load_recipe("training/recipes/gpu.yaml", overrides)
    torch.cuda.reset_peak_memory_stats()
    run_recipe(recipe, log=lambda line: print(line, file=sys.stderr, flush=True))
    if dist_utils.rank() != 0:
        return 0
    rows = {r["stage"]: r for r in read_parquet(recipe.run, "metrics.parquet").to_pylist()}
    lm = build_causal_lm(recipe.model, int(pool["vocab_size"]), 0, seed=0)
    n, m = n_params(lm), recipe.model
    flops_per_token = 6 * n + 12 * m.n_layers * m.max_seq_len * m.d_model
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    tokens_per_s = rows[0]["train_tokens_per_s"]
    result = {"device": name, "ranks": world, "params": n, "global_batch": args.batch_size, "seq_len": m.max_seq_len,
              "stage0_batches": args.steps, "ingest_seconds": round(ingest_seconds, 1),
              "tokens_per_s": round(tokens_per_s), "tokens_per_s_per_gpu": round(tokens_per_s / world),
              "mfu": round(tokens_per_s / world * flops_per_token / (peak * 1e12), 4) if peak else None,
              "peak_memory_gib_rank0": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
              "boundary_seconds": {k: round(v, 2) for k, v in stage_costs(read_stage_marker(recipe.run, 1)).items()},
              "stage1_tokens_per_s": round(rows[1]["train_tokens_per_s"]),
              "microbatch": recipe.train_loader.microbatch_size}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
