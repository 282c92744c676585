"""`mates bench projection`: one boundary at the papers' scale, in FLOPs, from the ledger's formulas.

Nothing is trained: the models are built on the meta device (shapes, no weights) and every phase
is curation/compute.py's arithmetic, the same that fills each stage's `_SUCCESS`. The setup is the
MATES paper's (Pythia-410M and 1B, 1,024-token samples, 80k probes per stage of 10k steps) with
the assumptions below stated, not measured; `candidates` = the stage's samples / the selection
ratio, or a pool of 10^8 candidates per stage. Figures go to training/results/bench/projection.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from curation import compute

RESULT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "training", "results", "bench",
                                       "projection.json"))


@dataclass(frozen=True)
class Setup:
    stage_steps: int = 10_000         # MATES: a boundary every 10k steps
    global_batch: int = 512           # 512 x 1,024 tokens = ~0.5M tokens a step (25B tokens in 50k steps)
    seq: int = 1024
    n_probes: int = 80_000            # the authors' probes per stage
    reference_rows: int = 1024        # target rows of the reference gradient (an assumption)
    selection_ratio: float = 0.2      # the authors keep 20% of the candidates
    encoder_len: int = 512            # the influence model reads the first 512 tokens of a sample
    fit_epochs: int = 3

    @property
    def stage_samples(self) -> int:
        return self.stage_steps * self.global_batch


LMS = {  # GPT-NeoX shapes of Pythia (Biderman et al. 2023, table 1)
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "pythia-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192),
}
ENCODERS = {  # BERT shapes: the authors' bert-base and our MiniLM-L6
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def lm_shape(name: str, seq: int) -> compute.Shape:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50_304, max_position_embeddings=seq, **LMS[name]))
    return compute.shape_of(model, context=seq)


def encoder_shape(name: str, seq: int) -> compute.Shape:
    import torch
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig(vocab_size=30_522, max_position_embeddings=512, **ENCODERS[name]))
    return compute.shape_of(model, context=seq)


def boundary(lm: compute.Shape, encoder: compute.Shape, setup: Setup, *, candidates: int, probe_method: str,
             backbone: str) -> dict:
    """FLOPs of each phase of one boundary, and each as a share of the stage's training."""
    train = compute.training_flops(lm, setup.stage_samples * setup.seq)
    probe = compute.probe_flops(lm, probe_method, probe_tokens=setup.n_probes * setup.seq,
                                reference_tokens=setup.reference_rows * setup.seq)
    probe_enc_tokens = setup.n_probes * setup.encoder_len
    candidate_enc_tokens = candidates * setup.encoder_len
    if backbone == "finetune":  # fit the encoder on the probes (90% fitted, 10% read), re-score every candidate
        fitted = int(0.9 * probe_enc_tokens) * setup.fit_epochs
        fit = compute.encoder_flops(encoder, fitted_tokens=fitted,
                                    scored_tokens=probe_enc_tokens * setup.fit_epochs - fitted)
        score = compute.encoder_flops(encoder, fitted_tokens=0, scored_tokens=candidate_enc_tokens)
        phases = {"probe": probe, "fit": fit, "score": score}
    else:  # frozen: each candidate embedded once (stages' pools are disjoint), a linear head: ~0
        embed = compute.encoder_flops(encoder, fitted_tokens=0, scored_tokens=candidate_enc_tokens)
        phases = {"probe": probe, "embed": embed}
    total = sum(phases.values())
    return {"train_flops": train, **{f"flops_{k}": v for k, v in phases.items()}, "curation_flops": total,
            **{f"share_{k}": v / train for k, v in phases.items()}, "curation_share": total / train}


def projection(setup: Setup = Setup()) -> dict:
    rows = []
    encoders = {name: encoder_shape(name, setup.encoder_len) for name in ENCODERS}
    for lm_name in LMS:
        lm = lm_shape(lm_name, setup.seq)
        for pool, candidates in (("paper", int(setup.stage_samples / setup.selection_ratio)), ("1e8", 10**8)):
            for encoder_name, backbone in (("bert-base", "finetune"), ("minilm-l6", "finetune"),
                                           ("minilm-l6", "frozen")):
                encoder = encoders[encoder_name]
                for probe_method in ("forward", "first_order"):
                    rows.append({"lm": lm_name, "candidates": candidates, "pool": pool, "encoder": encoder_name,
                                 "backbone": backbone, "probe_method": probe_method,
                                 **boundary(lm, encoder, setup, candidates=candidates, probe_method=probe_method,
                                            backbone=backbone)})
    return {"setup": asdict(setup), "rows": rows}


def table(result: dict) -> str:
    """The README's table: curation's share of the stage's training FLOPs, per phase."""
    lines = ["| LM | candidates | influence model | probes | probe | fit | score / embed | curation / training |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        scoring = r.get("share_score", r.get("share_embed", 0.0))
        lines.append(f"| {r['lm']} | {r['candidates']:,} | {r['encoder']} {r['backbone']} | {r['probe_method']} | "
                     f"{r['share_probe']:.3f} | {r.get('share_fit', 0.0):.4f} | {scoring:.3f} | "
                     f"**{r['curation_share']:.3f}** |")
    return "\n".join(lines)


def bench_projection(*, out: str | None = None, log=print) -> dict:
    result = projection()
    path = out or RESULT
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    log(table(result))
    log(f"bench projection: written to {path}")
    return result
