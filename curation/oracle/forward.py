"""Forward-only oracle probes (`probe_method: forward`, DESIGN.md 2.1): the `preconditioned`
influence without per-sample gradients, at the memory of an inference forward.

With Adam's preconditioner P = 1 / (sqrt(v_hat) + eps) held fixed (the stored second moment),

    I(x) ~ grad L_ref(theta) . (-lr P g_x) = -lr <u, g_x>,      u = P grad L_ref(theta)

and <u, g_x> = d/dh L_x(theta + h u) at h = 0: the derivative of x's OWN mean loss along u. One
u per prober (the reference gradient is accumulated in micro-batches of `reference_batch` rows,
so its memory is bounded whatever the target set's size); then a whole batch of candidates costs
one derivative of a batched forward:
* `central`: (L_x(theta + h u) - L_x(theta - h u)) / (2 h), two plain forwards. h is set by the
  textbook rule for a central difference (truncation h^2 against roundoff eps/h balance at
  h ~ eps^(1/3)), applied to the relative perturbation: h ||u|| = eps_machine^(1/3) ||theta||.
  Nothing here is tuned to one model.
* `jvp`: torch.func.jvp of the batched loss along u: exact up to roundoff, about 2-3 forwards.
`auto` picks `central` in fp32 and `jvp` in every other dtype (bf16: eps^(1/3) = 0.2 would move
the weights by a fifth of their norm; fp64: the jvp is exact and costs little more). Measured
accuracy and cost: `mates bench probe` (README, "forward-only oracle").

Not seen: the per-sample clip factor min(1, c / ||g_x||) of `preconditioned` (it needs ||g_x||,
which a directional derivative does not give) and x's own share of Adam's moments. Logits are
computed `LOGIT_CHUNK` positions at a time, so the vocabulary never multiplies the whole batch.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, jvp

from curation.lm.batching import IGNORE, ReferenceSet
from curation.oracle.probes import influence_in_chunks, model_from_state
from schemas.errors import MatesError

DERIVATIVES = ("auto", "central", "jvp")
LOGIT_CHUNK = 128   # positions per logits chunk: [B, 128, V] instead of [B, L, V]


class _ChunkedLoss(torch.nn.Module):
    """Per-row mean next-token loss of a causal LM, the logits made `LOGIT_CHUNK` positions at a time.

    Wraps the transformers LM as `self.lm` so torch.func.functional_call can swap its parameters
    (names prefixed `lm.`; a tied output embedding follows its input embedding).
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A ones mask: right padding is invisible to real tokens under the causal mask (probes.py).
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    use_cache=False).last_hidden_state            # [B, L, D]
        head = self.lm.get_output_embeddings()
        targets = labels[:, 1:]                                                   # [B, L-1]
        total = hidden.new_zeros(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
        for lo in range(0, targets.shape[1], LOGIT_CHUNK):
            t = targets[:, lo:lo + LOGIT_CHUNK]                                   # [B, c]
            logits = head(hidden[:, lo:lo + t.shape[1]])                          # [B, c, V]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            picked = logits.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, c]
            total = total + ((torch.logsumexp(logits, dim=-1) - picked) * (t != IGNORE)).sum(1)
        return total / (targets != IGNORE).sum(1).clamp(min=1)                    # [B]


def resolve_derivative(derivative: str, dtype: torch.dtype) -> str:
    if derivative not in DERIVATIVES:
        raise MatesError(f"`forward_derivative` must be one of {list(DERIVATIVES)}; got {derivative!r}.")
    if derivative != "auto":
        return derivative
    return "central" if dtype == torch.float32 else "jvp"


class ForwardProber:
    """-lr <u, g_x> for batches of candidates, by a directional derivative of their own loss."""

    def __init__(self, state: dict, reference: ReferenceSet, *, derivative: str = "auto",
                 reference_batch: int = 1, probe_batch: int = 16, device="cpu", dtype=torch.float32):
        if reference_batch < 1 or probe_batch < 1:
            raise MatesError(f"`reference_batch` and `probe_batch` must be >= 1; got "
                             f"{reference_batch} and {probe_batch}.")
        hp = state["hparams"]
        if hp.get("decoupled"):
            raise MatesError("`hparams.decoupled` is true (Composer DecoupledAdamW); the oracle "
                             "implements torch AdamW only. Train with `optimizer.name: adamw`.")
        self.derivative = resolve_derivative(derivative, dtype)
        self.device, self.dtype, self.probe_batch = device, dtype, probe_batch
        self.lr, self.eps, self.b2 = float(hp["lr"]), float(hp["eps"]), float(hp["betas"][1])
        self.loss = _ChunkedLoss(model_from_state(state, device, dtype))
        self.params = {n: p.detach() for n, p in self.loss.named_parameters()}   # theta, `lm.` names
        unknown = {f"lm.{n}" for n in state["exp_avg"]} - set(self.params)
        if unknown:
            raise MatesError(f"`exp_avg` of the probe state names parameters the model lacks: "
                             f"{sorted(unknown)[:5]}.")
        self.u = self._direction(state, reference, reference_batch)
        self.step_size = None
        if self.derivative == "central":
            self._central_params()

    def _reference_grad(self, reference: ReferenceSet, micro: int) -> dict[str, torch.Tensor]:
        """grad L_ref(theta) (mean over every counted reference token), `micro` rows per backward.

        Accumulated in the parameters' own .grad (no copy of theta, one gradient buffer): the peak
        is the weights, one gradient and one micro-batch's activations."""
        named = dict(self.loss.named_parameters())
        for p in named.values():
            p.requires_grad_(True)
            p.grad = None
        n_tokens = 0
        for batch in reference:
            ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
            for lo in range(0, ids.shape[0], micro):
                rows_ids, rows_labels = ids[lo:lo + micro], labels[lo:lo + micro]   # [r, L]
                counted = (rows_labels[:, 1:] != IGNORE).sum(1)                      # [r]
                if not int(counted.sum()):
                    continue
                # summed token loss = mean loss x count, so the total is one mean over all tokens
                (self.loss(rows_ids, rows_labels) * counted).sum().backward()
                n_tokens += int(counted.sum())
        grads = {}
        for n, p in named.items():
            grads[n] = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = None
            p.requires_grad_(False)
        if not n_tokens:
            raise MatesError("`reference` has no scored tokens; check its `target_start` column.")
        return {n: g.div_(n_tokens) for n, g in grads.items()}

    def _direction(self, state: dict, reference: ReferenceSet, micro: int) -> dict[str, torch.Tensor]:
        """u = grad L_ref / (sqrt(v_hat) + eps), v_hat the bias-corrected stored second moment."""
        u = self._reference_grad(reference, micro)
        for name, g in u.items():
            stored = name.removeprefix("lm.")
            if stored in state["exp_avg_sq"]:
                step = max(float(state["step"].get(stored, 0.0)), 1.0)
                v_hat = state["exp_avg_sq"][stored].to(self.device, self.dtype) / (1 - self.b2 ** step)
            else:   # no optimizer state yet: zero moments, as torch AdamW starts
                v_hat = torch.zeros_like(g)
            g.div_(v_hat.sqrt_().add_(self.eps))
        return u

    def _central_params(self) -> None:
        """theta +- h u, with h ||u|| = eps^(1/3) ||theta|| (the central-difference rule)."""
        norm = lambda d: math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))  # noqa: E731
        u_norm, theta_norm = norm(self.u), norm(self.params)
        if u_norm == 0:
            raise MatesError("the preconditioned reference gradient is zero; the target set's "
                             "loss does not depend on the model.")
        self.step_size = torch.finfo(self.dtype).eps ** (1 / 3) * theta_norm / u_norm
        h = self.step_size
        # theta - h u as new tensors; the model's own parameters become theta + h u in place, so
        # the prober holds two parameter sets, not three.
        self.minus = {n: p - h * self.u[n] for n, p in self.params.items()}
        for n, p in self.params.items():
            p.add_(self.u[n], alpha=h)
        self.plus, self.u = self.params, None

    @torch.no_grad()
    def _central(self, ids, labels) -> torch.Tensor:
        up = functional_call(self.loss, self.plus, (ids, labels))                 # [B]
        down = functional_call(self.loss, self.minus, (ids, labels))              # [B]
        return (up.double() - down.double()) / (2 * self.step_size)

    def _jvp(self, ids, labels) -> torch.Tensor:
        with torch.no_grad():
            _, derivative = jvp(lambda p: functional_call(self.loss, p, (ids, labels)),
                                (self.params,), (self.u,))                        # [B]
        return derivative

    def influence(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """-lr <u, g_x> for each row of a collated probe batch -> [B]."""
        ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)  # [B, L]
        fn = self._central if self.derivative == "central" else self._jvp
        out = [fn(ids[lo:lo + self.probe_batch], labels[lo:lo + self.probe_batch])
               for lo in range(0, ids.shape[0], self.probe_batch)]
        return -self.lr * torch.cat(out)


def forward_influence(state: dict, reference: ReferenceSet, samples: list[dict], *, pad_id: int,
                      probe_batch: int = 16, reference_batch: int = 1, derivative: str = "auto",
                      device="cpu", dtype=torch.float32, progress: Callable[[int], object] | None = None,
                      length: int | None = None) -> np.ndarray:
    """I(x) [N] (float64) of pool samples by forward-only probes, in their order (each chunk
    padded to `length`, default the longest sample)."""
    if not samples:
        return np.zeros(0)
    prober = ForwardProber(state, reference, derivative=derivative, reference_batch=reference_batch,
                           probe_batch=probe_batch, device=device, dtype=dtype)
    return influence_in_chunks(prober, samples, pad_id=pad_id, probe_batch=probe_batch,
                               n_ctx=prober.loss.lm.config.max_position_embeddings, length=length, progress=progress)
