"""Locally probed oracle data influence (MATES, DESIGN.md 2.1).

    I(x) = L_ref(A(theta, x)) - L_ref(theta)

A is ONE step of the run's own torch AdamW on x alone, from the moments and step stored in the
probe state (schemas/probe_state.py), with x's gradient clipped by its global L2 norm:

    g <- g * min(1, c / (||g|| + 1e-6))                  (torch.nn.utils.clip_grad_norm_, c > 0)
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   t <- t + 1
    delta = -lr wd theta - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Lower I(x) (a larger drop of the reference loss) is better data. Two methods:
* `exact`: per-sample gradients for a whole chunk of probes with torch.func (vmap over grad of a
  functional_call), the Adam update above as tensor maths with a leading probe dimension, then the
  reference loss of every updated parameter set with one vmapped forward. L_ref(theta) is one
  number per prober.
* `first_order`: I(x) ~ grad L_ref(theta) . delta_x, with the same exact delta_x. One reference
  gradient per prober, then each probe costs a per-sample gradient and a dot product.
* `preconditioned` (ours, not the papers'): first order with delta_x = -lr g / (sqrt(v_hat) + eps),
  x's own clipped gradient under the stored Adam preconditioner, without the momentum and without
  x's term in v. Why: in the one-step Adam update the shared momentum b1 m dominates delta_x, and
  x acts mostly through (1 - b2) g^2 in v, which shrinks that shared step. When the momentum step
  raises L_ref (the demo's stage boundaries: mean I(x) > 0), high-gradient text (character noise)
  then looks helpful because it damps the step most (measured: char_noise probes at z = -0.6 in
  every stage of the bench comparison). This variant scores x by its own direction only
  (Adam-preconditioned gradient alignment with the reference, as in LESS, Xia et al. 2024).
`slow_reference_influence` is the plain baseline (deepcopy + torch.optim.AdamW per probe) that the
tests and `mates bench probe` compare against.
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from curation.lm.batching import IGNORE, ReferenceSet, collate_samples
from schemas.errors import MatesError

METHODS = ("exact", "first_order", "preconditioned")           # per-sample gradients (this file)
PROBE_METHODS = (*METHODS, "forward")                          # + forward-only (oracle/forward.py)
# Probes per vmapped reference forward. A GPU needs many at once to fill it, up to this many logit
# elements ([probes, R, K, V]; 2^27 fp32 = 512 MiB). A CPU is already busy with one: measured on
# the demo model, 8 probes per vmap cost 1.1-2.8x more per probe than 1, so CPUs go one at a time.
LOGIT_BUDGET = {"cuda": 2 ** 27}


def model_from_state(state: dict, device, dtype=torch.float32) -> torch.nn.Module:
    """The transformers LM of a probe state, weights loaded, in eval mode with eager attention."""
    from curation.lm.model import ARCHITECTURES as archs

    if state.get("model_type") not in archs:
        raise MatesError(f"`model_type` must be one of {sorted(archs)}; got {state.get('model_type')!r}.")
    config_cls, model_cls = archs[state["model_type"]]
    config = config_cls.from_dict(dict(state["model_config"]))
    config._attn_implementation = "eager"  # torch.func transforms eager attention, CPU = CUDA maths
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    # A state written from named_parameters() may lack the tied copy (lm_head.weight): tolerated.
    tied = set(model.state_dict()) - {n for n, _ in model.named_parameters()} \
        - {n for n, _ in model.named_buffers()}
    if unexpected or set(missing) - tied:
        raise MatesError(f"`model` of the probe state does not fit its `model_config`: missing "
                         f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def probe_state_from_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                               grad_clip_norm: float, stage: int, model_type: str | None = None,
                               lr: float | None = None) -> dict:
    """The probe-state dict (schemas/probe_state.py, without format/version) of a live model.

    `model` is the transformers LM (not a Composer wrapper); the optimizer's params are matched to
    its parameter names by identity. `lr` defaults to the optimizer's current (scheduled) lr.
    """
    name = type(optimizer).__name__
    if name not in ("AdamW", "DecoupledAdamW"):
        raise MatesError(f"`optimizer` must be torch AdamW or Composer DecoupledAdamW; got {name}.")
    keys = ("betas", "eps", "weight_decay")
    groups = optimizer.param_groups
    if any(g.get("amsgrad") or g.get("maximize") for g in groups):
        raise MatesError("`optimizer` uses amsgrad or maximize; the oracle step supports neither.")
    if any(tuple(g[k] for k in keys) != tuple(groups[0][k] for k in keys) for g in groups):
        raise MatesError("`optimizer` param groups differ in betas/eps/weight_decay; the probe "
                         "state holds one set. Use one param group.")
    names = {id(p): n for n, p in model.named_parameters()}
    exp_avg, exp_avg_sq, step = {}, {}, {}
    for group in groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if id(p) not in names:
                raise MatesError("`optimizer` holds a parameter that `model` does not; pass the "
                                 "transformers LM whose parameters the optimizer trains.")
            if st:  # a parameter that never had a gradient has no state: zeros at step 0 on load
                exp_avg[names[id(p)]] = st["exp_avg"].detach().cpu().clone()
                exp_avg_sq[names[id(p)]] = st["exp_avg_sq"].detach().cpu().clone()
                step[names[id(p)]] = float(st["step"])
    g0 = groups[0]
    hparams = {"lr": float(g0["lr"] if lr is None else lr), "betas": [float(b) for b in g0["betas"]],
               "eps": float(g0["eps"]), "weight_decay": float(g0["weight_decay"]),
               "grad_clip_norm": float(grad_clip_norm), "decoupled": name == "DecoupledAdamW"}
    return {"stage": int(stage), "model_type": model_type or model.config.model_type,
            "model_config": model.config.to_dict(),
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": step, "hparams": hparams}


def _loss_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and counted tokens per row, logits[:, i] scored against targets[:, i].

    Same maths as batching.token_losses, written with logsumexp/gather (vmap-safe) and without its
    downcast to fp32, so a float64 probe stays float64.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))       # [B, K, V]
    counted = targets != IGNORE                                                # [B, K]
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, K]
    loss = (torch.logsumexp(logits, dim=-1) - picked) * counted                # [B, K]
    return loss.sum(dim=1), counted.sum(dim=1)


class OracleProber:
    """Influence of probe batches on one probe state's reference loss (`exact` or `first_order`)."""

    def __init__(self, state: dict, reference: ReferenceSet, *, method: str = "exact",
                 probe_batch: int = 16, device="cpu", dtype=torch.float32):
        if method not in METHODS:
            raise MatesError(f"`method` must be one of {list(METHODS)}; got {method!r}.")
        if probe_batch < 1:
            raise MatesError(f"`probe_batch` must be >= 1; got {probe_batch}.")
        hp = state["hparams"]
        if hp.get("decoupled"):
            raise MatesError("`hparams.decoupled` is true (Composer DecoupledAdamW); the oracle "
                             "implements torch AdamW only. Train with `optimizer.name: adamw`.")
        self.method, self.probe_batch, self.device, self.dtype = method, probe_batch, device, dtype
        self.model = model_from_state(state, device, dtype)
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}  # theta
        self.buffers = dict(self.model.named_buffers())
        unknown = set(state["exp_avg"]) - set(self.params)
        if unknown:
            raise MatesError(f"`exp_avg` of the probe state names parameters the model lacks: "
                             f"{sorted(unknown)[:5]}.")
        # A parameter without optimizer state starts from zero moments at step 0, as in torch.
        def moment(stored: dict) -> dict[str, torch.Tensor]:
            return {n: stored[n].to(device=device, dtype=dtype) if n in stored else torch.zeros_like(p)
                    for n, p in self.params.items()}
        self.exp_avg, self.exp_avg_sq = moment(state["exp_avg"]), moment(state["exp_avg_sq"])
        self.step = {n: float(state["step"].get(n, 0.0)) for n in self.params}
        self.lr, self.eps, self.wd = float(hp["lr"]), float(hp["eps"]), float(hp["weight_decay"])
        self.b1, self.b2 = (float(b) for b in hp["betas"])
        self.clip = float(hp.get("grad_clip_norm") or 0.0)
        # Reference batches as (input_ids [R, L], keep [K], targets [R, K]): logits are computed
        # only at the K positions some row scores (LAMBADA-style targets need a handful).
        self.ref = []
        for batch in reference:
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            keep = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)   # [K]
            if keep.numel():
                self.ref.append((ids, keep, labels[:, keep + 1]))
        self.n_ref_tokens = sum(int((t != IGNORE).sum()) for _, _, t in self.ref)
        if not self.n_ref_tokens:
            raise MatesError("`reference` has no scored tokens; check its `target_start` column.")
        self._base: float | None = None                       # L_ref(theta), once per prober
        self._ref_grad: dict[str, torch.Tensor] | None = None  # grad L_ref(theta), first_order only

    def _logits(self, params, input_ids, keep=None) -> torch.Tensor:
        # A ones mask: right padding is already invisible to real tokens under the causal mask,
        # and without a mask transformers checks the ids for padding (data-dependent, breaks vmap).
        kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False}
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        return functional_call(self.model, (params, self.buffers), args=(), kwargs=kwargs).logits

    def _ref_sum(self, params, ids, keep, targets) -> torch.Tensor:
        """Summed reference loss of one reference batch under `params` (a scalar)."""
        return _loss_sums(self._logits(params, ids, keep), targets)[0].sum()

    def _probe_loss(self, params, input_ids, labels) -> torch.Tensor:
        """x's mean next-token loss; input_ids, labels [L] (one probe, vmapped over the chunk)."""
        logits = self._logits(params, input_ids[None])                        # [1, L, V]
        loss, n = _loss_sums(logits[:, :-1], labels[None, 1:])                # [1], [1]
        return loss[0] / n[0].clamp(min=1)

    def _delta(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The AdamW update of each probe: {name: [C, *param.shape]}."""
        grads = vmap(grad(self._probe_loss), in_dims=(None, 0, 0))(self.params, input_ids, labels)
        if self.clip > 0:
            norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()  # [C]
            coef = (self.clip / (norm + 1e-6)).clamp(max=1.0)                                        # [C]
        delta = {}
        for n, g in grads.items():                   # g [C, *shape], ours: updated in place
            g = g.contiguous()  # a data-independent grad comes back from vmap expanded (stride 0)
            if self.clip > 0:
                g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
            if self.method == "preconditioned":      # x's direction under the stored preconditioner
                v_hat = self.exp_avg_sq[n] / (1 - self.b2 ** max(self.step[n], 1.0))
                delta[n] = g.div_(v_hat.sqrt().add_(self.eps)).mul_(-self.lr)
                continue
            t = self.step[n] + 1
            v = (g * g).mul_(1 - self.b2).add_(self.exp_avg_sq[n], alpha=self.b2)   # v_t
            m = g.mul_(1 - self.b1).add_(self.exp_avg[n], alpha=self.b1)            # m_t
            denom = v.sqrt_().div_((1 - self.b2 ** t) ** 0.5).add_(self.eps)
            # Decoupled weight decay acts on theta itself, so it is part of every probe's delta.
            delta[n] = (m.div_(denom).mul_(-self.lr / (1 - self.b1 ** t))
                        .sub_(self.params[n], alpha=self.lr * self.wd))
        return delta

    @torch.no_grad()
    def _ref_loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_ref of a stack of parameter sets {name: [P, *shape]} -> [P]."""
        n_sets = next(iter(params.values())).shape[0]
        widest = max(ids.shape[0] * keep.numel() for ids, keep, _ in self.ref)
        budget = LOGIT_BUDGET.get(torch.device(self.device).type, 0)
        chunk = max(1, budget // (widest * self.model.config.vocab_size))
        out = []
        for lo in range(0, n_sets, chunk):
            sub = {n: p[lo:lo + chunk] for n, p in params.items()}
            if chunk == 1:  # nothing to batch (CPU): skip vmap's batching rules, ~10-20% faster
                one = {n: p[0] for n, p in sub.items()}
                total = sum(self._ref_sum(one, *batch) for batch in self.ref).reshape(1)
            else:
                total = sum(vmap(self._ref_sum, in_dims=(0, None, None, None))(sub, *batch)
                            for batch in self.ref)                             # [chunk]
            out.append(total / self.n_ref_tokens)
        return torch.cat(out)

    def base_loss(self) -> float:
        """L_ref(theta), through the same vmapped path as the probes so roundoff cancels."""
        if self._base is None:
            self._base = float(self._ref_loss({n: p[None] for n, p in self.params.items()})[0])
        return self._base

    def reference_grad(self) -> dict[str, torch.Tensor]:
        """grad L_ref(theta) {name: [*shape]}, computed once per prober."""
        if self._ref_grad is None:
            acc = {n: torch.zeros_like(p) for n, p in self.params.items()}
            for batch in self.ref:
                for n, g in grad(self._ref_sum)(self.params, *batch).items():
                    acc[n] += g
            self._ref_grad = {n: g / self.n_ref_tokens for n, g in acc.items()}
        return self._ref_grad

    def influence(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """I(x) for each row of a collated probe batch -> [B] (on the prober's device)."""
        ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)  # [B, L]
        out = []
        for lo in range(0, ids.shape[0], self.probe_batch):
            delta = self._delta(ids[lo:lo + self.probe_batch], labels[lo:lo + self.probe_batch])
            if self.method == "exact":
                updated = {n: d.add_(self.params[n]) for n, d in delta.items()}  # theta + delta [C, *shape]
                out.append(self._ref_loss(updated) - self.base_loss())
            else:
                ref_grad = self.reference_grad()
                out.append(sum((d * ref_grad[n]).flatten(1).sum(1) for n, d in delta.items()))  # [C]
        return torch.cat(out)


def _check_lengths(samples: list[dict], n_ctx: int, at_least: int = 0) -> int:
    """The padded length: the longest sample (or `at_least`), refused past the model's context."""
    length = max(max(len(s["tokens"]) for s in samples), at_least)
    if length > n_ctx:
        raise MatesError(f"probe samples must be at most the model's {n_ctx} tokens; got {length}.")
    return length


def influence_in_chunks(prober, samples: list[dict], *, pad_id: int, probe_batch: int, n_ctx: int,
                        length: int | None, progress: Callable[[int], object] | None) -> np.ndarray:
    """`prober.influence` over `samples` in chunks of `probe_batch`, every chunk padded to `length`
    (default: the longest sample; the ranks of a launched run share one) -> I(x) [N] float64."""
    length = _check_lengths(samples, n_ctx, length or 0)
    out = []
    for lo in range(0, len(samples), probe_batch):
        chunk = samples[lo:lo + probe_batch]
        out.append(prober.influence(collate_samples(chunk, pad_id, length=length)).double().cpu().numpy())
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out)


def probe_influence(state: dict, reference: ReferenceSet, samples: list[dict], *, method: str = "exact",
                    probe_batch: int = 16, pad_id: int, device="cpu", dtype=torch.float32,
                    progress: Callable[[int], object] | None = None, reference_batch: int = 1,
                    derivative: str = "auto", length: int | None = None) -> np.ndarray:
    """I(x) [N] (float64) of pool samples ({"tokens", "sample_id"}), in their order.

    Every chunk is padded to the same length so the vmapped shapes never change. `progress`, if
    given, is called with the number of probes finished after each chunk (e.g. tqdm's `update`).
    `reference_batch` and `derivative` are `forward`'s (curation/oracle/forward.py). `length`
    (default: the longest sample) pads every chunk to it: the ranks of a launched run share one.
    """
    if method == "forward":
        from curation.oracle.forward import forward_influence

        return forward_influence(state, reference, samples, pad_id=pad_id, probe_batch=probe_batch,
                                 reference_batch=reference_batch, derivative=derivative,
                                 device=device, dtype=dtype, progress=progress, length=length)
    if not samples:
        return np.zeros(0)
    prober = OracleProber(state, reference, method=method, probe_batch=probe_batch, device=device,
                          dtype=dtype)
    return influence_in_chunks(prober, samples, pad_id=pad_id, probe_batch=probe_batch,
                               n_ctx=prober.model.config.max_position_embeddings, length=length, progress=progress)


@torch.no_grad()
def mean_reference_loss(model: torch.nn.Module, reference: ReferenceSet, device) -> float:
    """batching.mean_token_loss, but keeping float64 logits float64 (see _loss_sums)."""
    total, count = 0.0, 0
    for batch in reference:
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits          # [R, L, V]
        loss, n = _loss_sums(logits[:, :-1], batch["labels"][:, 1:].to(device))
        total, count = total + float(loss.sum()), count + int(n.sum())
    return total / max(count, 1)


def slow_reference_influence(state: dict, reference: ReferenceSet, samples: list[dict], pad_id: int,
                             device="cpu", dtype=torch.float32) -> np.ndarray:
    """BASELINE, for tests and benchmarks only: I(x) [N] by deepcopy + torch.optim.AdamW per probe."""
    hp = state["hparams"]
    if hp.get("decoupled"):
        raise MatesError("`hparams.decoupled` is true; the baseline implements torch AdamW only.")
    model = model_from_state(state, device, dtype)
    length = _check_lengths(samples, model.config.max_position_embeddings)
    base = mean_reference_loss(model, reference, device)
    out = []
    for sample in samples:
        probe = copy.deepcopy(model)
        params = list(probe.parameters())
        opt = torch.optim.AdamW(params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                                weight_decay=hp["weight_decay"])
        names = [n for n, _ in probe.named_parameters()]
        opt.load_state_dict({"param_groups": [{**opt.param_groups[0], "params": list(range(len(params)))}],
                             "state": {i: {"step": torch.as_tensor(float(state["step"][n])),
                                           # clones: load_state_dict aliases same-dtype tensors
                                           # and step() would then overwrite the probe state
                                           "exp_avg": state["exp_avg"][n].clone(),
                                           "exp_avg_sq": state["exp_avg_sq"][n].clone()}
                                       for i, n in enumerate(names) if n in state["exp_avg"]}})
        batch = {k: v.to(device) for k, v in collate_samples([sample], pad_id, length=length).items()}
        logits = probe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = _loss_sums(logits[:, :-1], batch["labels"][:, 1:])
        (loss.sum() / n.sum().clamp(min=1)).backward()
        if hp.get("grad_clip_norm", 0) > 0:
            torch.nn.utils.clip_grad_norm_(params, hp["grad_clip_norm"])
        opt.step()
        out.append(mean_reference_loss(probe, reference, device) - base)
    return np.asarray(out, dtype=np.float64)
