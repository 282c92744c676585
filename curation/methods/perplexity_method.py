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
    """Nothing is fitted: every rank loads the stage's model state and scores its slice's losses;
    rank 0 z-scores them all (`finish`)."""

    name = "perplexity"
    n_buckets = 4
    parallel_scoring = True

    def prepare(self, ctx: StageContext) -> None:
        self.load(ctx)

    def load(self, ctx: StageContext) -> None:
        """The model at this boundary, its shape (for the ledger), the pool and the pad id; once."""
        from curation.oracle.probes import model_from_state

        if getattr(self, "model", None) is not None:
            return
        if ctx.state_url is None:
            raise MatesError("`perplexity` needs a trained model state; stage 0 is always `random`.")
        parent, _, name = ctx.state_url.rstrip("/").rpartition("/")
        state = load_probe_state(parent, name)
        self.model, self.shape = model_from_state(state, ctx.device), ledger.lm_shape(state)
        self.pad_id = load_pool_tokenizer(ctx.data_url).token_to_id(EOS)
        self.pool = MDSFolder(join(ctx.data_url, "pool"))

    def score_slice(self, ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
        """Mean next-token loss [n] of `sample_ids`, and its ledger: one LM forward over their tokens."""
        from curation.compute import eval_flops

        self.load(ctx)
        t0 = time.perf_counter()
        losses = sample_losses(self.model, self.pool, sample_ids, self.pad_id, batch_size=ctx.options.batch_size,
                               device=ctx.device)
        ctx.timings["score"] = time.perf_counter() - t0
        tokens = ledger.sample_tokens(self.pool, sample_ids)
        ledger.record(ctx, "score", eval_flops(self.shape, tokens), scored_tokens=tokens)
        ctx.metrics["curation/ledger/lm_forward_flops_per_token"] = self.shape.forward_per_token()
        return losses

    def finish(self, ctx: StageContext, losses: np.ndarray, world_size: int = 1) -> np.ndarray:
        ctx.log(f"  perplexity: candidate loss median {np.median(losses):.3f}, "
                f"5%-95% {np.percentile(losses, 5):.3f}-{np.percentile(losses, 95):.3f}; band `{ctx.options.band}`")
        z = standardized(losses)
        return {"middle": np.abs(z), "low": z, "high": -z}[ctx.options.band]
