"""Benchmarks of the forward-only oracle (curation/oracle/forward.py): accuracy of its derivative
modes, its speed next to training, and peak memory next to an inference forward.

    mates bench probe            # ... + forward: accuracy per mode, probes/s over train samples/s
    mates bench probe-memory     # peak RSS at GPT-2-small size (124M, seq 512), one subprocess each

Metric keys (`curation/probe/` + key):
| key | meaning |
|---|---|
| `forward_<mode>_<dtype>_rel_err` | max abs error / max abs truth; truth = fp64 jvp (exact up to roundoff) |
| `forward_<mode>_<dtype>_spearman` | rank agreement with the truth |
| `forward_<mode>_<dtype>_probes_per_s` | steady probes/s (u already computed) |
| `train_samples_per_s` | AdamW training samples/s of the same model, batch and length |
| `forward_over_train` | forward probes/s (`auto` mode, fp32, steady) over training samples/s, A B B A runs |
| `peak_rss_gb_<what>` | peak resident memory of a subprocess doing only <what> |
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

KEY = "curation/probe/"
MODES = [("jvp", torch.float64), ("central", torch.float32), ("jvp", torch.float32),
         ("central", torch.bfloat16), ("jvp", torch.bfloat16)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def forward_accuracy(state: dict, reference, batches: list[dict], *, device="cpu") -> dict:
    """Each (mode, dtype) of `forward` against the fp64 jvp on the same probe batches."""
    from scipy.stats import spearmanr

    from curation.oracle.forward import ForwardProber

    out, truth = {}, None
    for mode, dtype in MODES:
        prober = ForwardProber(state, reference, derivative=mode, device=device, dtype=dtype)
        start = time.perf_counter()
        got = torch.cat([prober.influence(b) for b in batches]).double().cpu().numpy()
        seconds = time.perf_counter() - start
        name = f"{KEY}forward_{mode}_{_dtype_name(dtype)}"
        if truth is None:
            truth = got
        out[f"{name}_rel_err"] = float(np.abs(got - truth).max() / np.abs(truth).max())
        out[f"{name}_spearman"] = float(spearmanr(got, truth)[0])
        out[f"{name}_probes_per_s"] = sum(len(b["input_ids"]) for b in batches) / seconds
    return out


def _trainer(state: dict, device):
    """One AdamW training step (forward, backward, clip, step) of the probe state's model."""
    from curation.lm.batching import token_losses
    from curation.oracle.probes import model_from_state

    model = model_from_state(state, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch):
        loss, n = token_losses(model(input_ids=batch["input_ids"].to(device)).logits, batch["labels"].to(device))
        (loss.sum() / n.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _rate(fn, batches, device) -> float:
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - start)


def forward_figures(state: dict, reference, batches: list[dict], *, device="cpu", repeats: int = 2) -> dict:
    """Accuracy per mode, and `auto` fp32 forward probes/s over AdamW training samples/s on the same
    batches: measured in A B B A order (`repeats` pairs) so a shared machine's drift falls on both
    sides; the ratio is of the summed samples over the summed seconds of each side."""
    from curation.oracle.forward import ForwardProber, resolve_derivative

    out = forward_accuracy(state, reference, batches, device=device)
    auto = resolve_derivative("auto", torch.float32)
    prober = ForwardProber(state, reference, derivative=auto, device=device)
    train = _trainer(state, device)
    train(batches[0])  # warm-up: the optimizer's state is allocated at the first step
    runs = {"forward": [], "train": []}
    for _ in range(repeats):
        for side in ("forward", "train", "train", "forward"):
            runs[side].append(_rate(prober.influence if side == "forward" else train, batches, device))
    n = sum(len(b["input_ids"]) for b in batches)
    rate = {k: len(v) * n / sum(n / r for r in v) for k, v in runs.items()}
    out[f"{KEY}train_samples_per_s"] = rate["train"]
    out[f"{KEY}forward_auto_probes_per_s"] = rate["forward"]
    out[f"{KEY}forward_over_train"] = rate["forward"] / rate["train"]
    out[f"{KEY}forward_over_train_each_run"] = [round(f / t, 3) for f, t in zip(runs["forward"], runs["train"])]
    out[f"{KEY}load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


# ---------------------------------------------------------------- peak memory, one subprocess each
GPT2_SMALL = dict(d_model=768, n_layers=12, n_heads=12)


def _memory_child(what: str, batch: int, seq: int, vocab: int, n_reference: int) -> dict:
    """Runs in its own process: build the state, do only `what`, return peak RSS."""
    from curation.lm.batching import collate_samples
    from curation.oracle.probes import probe_influence
    from jobs.bench_probe import toy_reference, toy_samples
    from schemas.recipe import ModelConfig
    from curation.lm.model import build_causal_lm
    from curation.oracle.probes import probe_state_from_optimizer

    cfg = ModelConfig(max_seq_len=seq, **GPT2_SMALL)
    model = build_causal_lm(cfg, vocab_size=vocab, eos_id=0, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # moments as after some training, without a training step's memory
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.full_like(p, 1e-6)}
    state = probe_state_from_optimizer(model, opt, grad_clip_norm=1.0, stage=1, model_type="gpt2")
    samples = toy_samples(batch, vocab, min_len=seq, max_len=seq)
    del model, opt
    start = time.perf_counter()
    if what == "inference":
        from curation.oracle.probes import model_from_state

        lm = model_from_state(state, "cpu")
        with torch.no_grad():
            lm(input_ids=collate_samples(samples, 0)["input_ids"]).logits.sum()
    else:
        method, _, derivative = what.partition(":")
        reference = toy_reference(n_reference, seq, vocab)
        probe_influence(state, reference, samples, method=method, probe_batch=batch, pad_id=0,
                        derivative=derivative or "auto")
    return {"seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def probe_memory(*, batch: int = 16, seq: int = 512, vocab: int = 50257, n_reference: int = 1,
                 cap_gb: float = 14.0, whats=("inference", "forward:central", "forward:jvp", "first_order"),
                 log=print) -> dict:
    """Peak RSS of each `what` in a fresh subprocess capped at `cap_gb` of address space (a probe
    that does not fit fails there, not in the machine's OOM killer). first_order is retried at
    halved batches until it fits, and the batch it fits at is reported. One reference sequence:
    first_order's reference gradient (one torch.func backward of a whole reference batch) did
    not fit under 14 GB with 4 sequences of 512 tokens, whatever the probe batch."""
    out = {f"{KEY}memory_model": f"gpt2 d768 L12 vocab {vocab} seq {seq}", f"{KEY}memory_probe_batch": batch}
    for what in whats:
        b = batch
        while b >= 1:
            code = (f"import json, resource; resource.setrlimit(resource.RLIMIT_AS, ({int(cap_gb * 2 ** 30)},) * 2); "
                    f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
                    f"from jobs.bench_oracle import _memory_child; "
                    f"print('RESULT', json.dumps(_memory_child({what!r}, {b}, {seq}, {vocab}, {n_reference})))")
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            name = what.replace(":", "_")
            if line:
                got = json.loads(line[0][7:])
                out[f"{KEY}peak_rss_gb_{name}"] = round(got["peak_rss_gb"], 2)
                out[f"{KEY}seconds_{name}"] = round(got["seconds"], 1)
                out[f"{KEY}batch_{name}"] = b
                log(f"bench probe-memory: {what} at batch {b}: {got['peak_rss_gb']:.2f} GB peak RSS, "
                    f"{got['seconds']:.0f} s")
                break
            log(f"bench probe-memory: {what} at batch {b} did not fit under {cap_gb} GB "
                f"({(run.stderr.strip().splitlines() or ['?'])[-1][-160:]})")
            out[f"{KEY}did_not_fit_{name}"] = out.get(f"{KEY}did_not_fit_{name}", []) + [b]
            if not what.startswith("first_order"):
                break
            b //= 2
    if f"{KEY}peak_rss_gb_inference" in out and f"{KEY}peak_rss_gb_forward_central" in out:
        out[f"{KEY}forward_over_inference_memory"] = round(
            out[f"{KEY}peak_rss_gb_forward_central"] / out[f"{KEY}peak_rss_gb_inference"], 3)
    out[f"{KEY}load_average_1min"] = round(os.getloadavg()[0], 2)
    return out
