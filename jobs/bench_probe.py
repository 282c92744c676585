"""Benchmark of the oracle prober (`mates bench probe`) and the toy probe states it and the tests use.

    python -m jobs.bench_probe --threads 1   # demo size: GPT-2 d128 x 4 layers, vocab 4096

On a shared CPU box use `--threads 1`: with other work running, torch's OpenMP threads spin and
the timings (the slow baseline's most of all) swing 3-10x between runs.

Metric keys (`curation/probe/` + key; `M` is exact, first_order or slow):
| key | meaning |
|---|---|
| `M_probes_per_s` | probes per second, end to end (one-time setup included) |
| `M_setup_s` | one-time seconds: model rebuild + L_ref(theta), + grad L_ref for first_order |
| `M_steady_probes_per_s` | probes per second after the setup (what 80k probes per stage see) |
| `M_speedup`, `M_steady_speedup` | exact and first_order rates over the slow baseline's, same run |
| `spearman_first_order_vs_exact` | rank agreement of the two methods |
| `max_rel_diff_exact_vs_slow` | max abs(exact - slow) / max abs(slow) |
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import torch

from curation.lm.batching import ReferenceSet, collate_samples, collate_sequences, token_losses
from curation.oracle.probes import (METHODS, OracleProber, mean_reference_loss, model_from_state,
                              probe_state_from_optimizer, slow_reference_influence)
from schemas import tables
from schemas.recipe import ModelConfig
from curation.lm.model import build_causal_lm


def toy_probe_state(cfg: ModelConfig, vocab_size: int, *, train_steps: int = 5, lr: float = 1e-3,
                    weight_decay: float = 0.1, grad_clip_norm: float = 1.0, seed: int = 0) -> dict:
    """A probe state as the stage loop makes one: a fresh LM trained a few AdamW steps on random
    tokens (so the moments are non-zero), then `probe_state_from_optimizer`."""
    model = build_causal_lm(cfg, vocab_size=vocab_size, eos_id=0, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        ids = torch.randint(1, vocab_size, (4, cfg.max_seq_len), generator=gen).tolist()
        batch = collate_sequences(ids, pad_id=0)
        loss, n = token_losses(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        (loss.sum() / n.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        opt.step()
        opt.zero_grad()
    return probe_state_from_optimizer(model, opt, lr=lr, grad_clip_norm=grad_clip_norm, stage=1,
                                      model_type=cfg.name)


def toy_reference(n: int, seq_len: int, vocab_size: int, *, target_start: int = 0, pad_id: int = 0,
                  batch_size: int = 16, seed: int = 1) -> ReferenceSet:
    """A REFERENCE table of random sequences, wrapped in a ReferenceSet."""
    rng = np.random.default_rng(seed)
    table = pa.table({"input_ids": [rng.integers(1, vocab_size, seq_len).tolist() for _ in range(n)],
                      "target_start": [target_start] * n})
    return ReferenceSet(tables.conform(table, tables.REFERENCE), pad_id=pad_id, batch_size=batch_size)


def toy_samples(n: int, vocab_size: int, *, min_len: int, max_len: int, seed: int = 2) -> list[dict]:
    """Pool-like samples ({"tokens": uint16, "sample_id"}) of varied lengths (so padding is exercised)."""
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(1, vocab_size, rng.integers(min_len, max_len + 1)).astype(np.uint16),
             "sample_id": i} for i in range(n)]


def _timed(fn, device) -> tuple[object, float]:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_probe(state: dict, reference: ReferenceSet, samples: list[dict], pad_id: int, device="cpu",
                probe_batch: int = 16) -> dict:
    """probes/s of exact, first_order and the slow baseline on the same samples, and their agreement.

    Each method's one-time setup (model rebuild, L_ref(theta), and for first_order grad L_ref) is
    timed apart, so both the end-to-end and the steady per-probe rate are reported.
    """
    from scipy.stats import spearmanr

    length = max(len(s["tokens"]) for s in samples)
    batches = [collate_samples(samples[i:i + probe_batch], pad_id, length=length)
               for i in range(0, len(samples), probe_batch)]
    results, setup, total = {}, {}, {}
    for method in METHODS:
        def prepare(method=method):
            prober = OracleProber(state, reference, method=method, probe_batch=probe_batch, device=device)
            if method == "exact":
                prober.base_loss()
            else:
                prober.reference_grad()
            return prober
        prober, setup[method] = _timed(prepare, device)
        out, seconds = _timed(lambda: torch.cat([prober.influence(b) for b in batches]), device)
        results[method], total[method] = out.double().cpu().numpy(), setup[method] + seconds
    # The baseline's own setup (rebuild + L_ref(theta)), timed apart as for the two methods.
    _, setup["slow"] = _timed(lambda: mean_reference_loss(model_from_state(state, device), reference, device),
                              device)
    results["slow"], total["slow"] = _timed(
        lambda: slow_reference_influence(state, reference, samples, pad_id, device), device)
    n, key = len(samples), "curation/probe/"
    rate = {m: n / t for m, t in total.items()}
    steady = {m: n / max(total[m] - setup[m], 1e-9) for m in total}
    out = {f"{key}n_probes": n}
    for m in ("exact", "first_order", "slow"):
        out |= {f"{key}{m}_probes_per_s": rate[m], f"{key}{m}_steady_probes_per_s": steady[m],
                f"{key}{m}_setup_s": setup[m]}
    for m in METHODS:
        out |= {f"{key}{m}_speedup": rate[m] / rate["slow"],
                f"{key}{m}_steady_speedup": steady[m] / steady["slow"]}
    out[f"{key}spearman_first_order_vs_exact"] = float(spearmanr(results["first_order"], results["exact"])[0])
    out[f"{key}max_rel_diff_exact_vs_slow"] = float(np.abs(results["exact"] - results["slow"]).max()
                                                    / np.abs(results["slow"]).max())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--reference", type=int, default=64, help="reference sequences")
    parser.add_argument("--target-start", type=int, default=0, help="scored from this index on")
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--probe-batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=args.seq_len)
    state = toy_probe_state(cfg, args.vocab)
    reference = toy_reference(args.reference, args.seq_len, args.vocab, target_start=args.target_start)
    samples = toy_samples(args.probes, args.vocab, min_len=args.seq_len // 2, max_len=args.seq_len)
    print(json.dumps(bench_probe(state, reference, samples, pad_id=0, device=args.device,
                                 probe_batch=args.probe_batch), indent=1))


if __name__ == "__main__":
    main()
