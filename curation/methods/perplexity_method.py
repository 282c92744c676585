"""`perplexity`: keep candidates by their loss under the current model (the stage checkpoint).

Which band: the middle (default). Marion et al. (2023, "When less is more") found that keeping
the middle of the perplexity distribution beats keeping the lowest; the lowest-loss sequences are
the repetitive ones (boilerplate, near-duplicates, spam templates: the demo corpus' junk tiers),
and the highest-loss ones are noise. `band: low` and `band: high` are there for comparison.
Scores are z-scored (pred = |z| for middle, z for low, -z for high), so the default temperature
makes the shared Gumbel top-k nearly a plain top-k.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from curation.lm.batching import collate_samples, token_losses
from curation.data.tokenizer import EOS, load_pool_tokenizer
from curation.methods import ledger
from curation.methods.base import CurationMethod, StageContext
from curation.store.pool import MDSFolder
from curation.select.gumbel import standardized
from schemas.errors import MatesError
from schemas.probe_state import load_probe_state
from schemas.storage import join


@torch.no_grad()
def sample_losses(model: torch.nn.Module, pool: MDSFolder, sample_ids: np.ndarray, pad_id: int, *,
                  batch_size: int, device) -> np.ndarray:
    """Mean next-token loss [N] of each pool sample under `model`."""
    out = []
    for start in range(0, len(sample_ids), batch_size):
        batch = collate_samples([pool[int(i)] for i in sample_ids[start:start + batch_size]], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        total, count = token_losses(logits, batch["labels"].to(device))
        out.append((total / count.clamp(min=1)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


class PerplexityMethod(CurationMethod):
    name = "perplexity"
    n_buckets = 4

    def predict(self, ctx: StageContext) -> np.ndarray:
        from curation.compute import eval_flops
        from curation.oracle.probes import model_from_state

        if ctx.state_url is None:
            raise MatesError("`perplexity` needs a trained model state; stage 0 is always `random`.")
        parent, _, name = ctx.state_url.rstrip("/").rpartition("/")
        state = load_probe_state(parent, name)
        model = model_from_state(state, ctx.device)
        pad_id = load_pool_tokenizer(ctx.data_url).token_to_id(EOS)
        pool = MDSFolder(join(ctx.data_url, "pool"))
        t0 = time.perf_counter()
        losses = sample_losses(model, pool, ctx.candidates, pad_id, batch_size=ctx.options.batch_size,
                               device=ctx.device)
        ctx.timings["score"] = time.perf_counter() - t0
        # the compute ledger: one LM forward over every candidate token
        tokens, shape = ledger.sample_tokens(pool, ctx.candidates), ledger.lm_shape(state)
        ledger.record(ctx, "score", eval_flops(shape, tokens), scored_tokens=tokens)
        ctx.metrics["curation/ledger/lm_forward_flops_per_token"] = shape.forward_per_token()
        ctx.log(f"  perplexity: candidate loss median {np.median(losses):.3f}, "
                f"5%-95% {np.percentile(losses, 5):.3f}-{np.percentile(losses, 95):.3f}; band `{ctx.options.band}`")
        z = standardized(losses)
        return {"middle": np.abs(z), "low": z, "high": -z}[ctx.options.band]
