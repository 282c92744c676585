"""The life of one stage's Composer Trainer: where its schedule starts, what it is given, how
it is released, and its token count over the ranks.

Why these are needed (each was a silent wrong result, issue 23):
* Composer builds its LambdaLR in the Trainer's constructor, at timestamp 0, so restoring the
  timestamp afterwards left the first batch of every later stage at the schedule's t = 0 lr.
* A Trainer stays alive after `fit()` through three holders: the caller's variable, the atexit
  hook Composer's engine registers with the state (model, optimizer), and torch's `_get_fqns`
  cache (torch.distributed.checkpoint.state_dict, filled when Composer saves a checkpoint).
  Until all three let go, the stage's model and AdamW moments stay in memory through curation.
"""
from __future__ import annotations

import atexit
import os
import sys
import warnings

from training import dist_utils


def restore_timestamp(trainer, start: dict) -> None:
    """Put the Trainer at `start` (batch, sample, token) with the lr an uninterrupted run has there.

    Composer steps its schedulers at the end of batch b *before* it advances the timestamp, so
    batch b + 1 trains at schedule(b). The first batch after a restore must therefore train at
    schedule(start - 1): step the schedulers once with the timestamp one batch back (our
    schedules are in batches, so sample/token there do not matter), then restore it."""
    from composer.core import Timestamp

    state = trainer.state
    if start["batch"] > 0:
        state.timestamp = Timestamp(batch=start["batch"] - 1)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
            warnings.simplefilter("ignore")
            for scheduler in state.schedulers:
                scheduler.step()
    state.timestamp = Timestamp(batch=start["batch"], sample=start["sample"], token=start["token"])


def lr_now(trainer) -> float:
    return float(trainer.state.optimizers[0].param_groups[0]["lr"])


def num_workers(recipe) -> int:
    """`train_loader.num_workers`, default 1 on Linux (loading overlaps the step), 0 elsewhere
    (macOS and Windows spawn workers, which re-import torch for every stage)."""
    n = recipe.train_loader.num_workers
    return n if n is not None else (1 if sys.platform.startswith("linux") else 0)


def trainer_options(recipe, device: str, stage: int) -> dict:
    """The Trainer arguments that come from recipe keys: micro-batching, parallelism, compile,
    the recipe's loggers and callbacks, and a per-stage run name."""
    from training.plugins import build_callbacks, build_loggers

    out = {"loggers": build_loggers(recipe.loggers), "callbacks": build_callbacks(recipe.callbacks),
           "run_name": f"{os.path.basename(recipe.run.rstrip('/')) or 'run'}-stage-{stage}"}
    if recipe.train_loader.microbatch_size is not None:
        out["device_train_microbatch_size"] = recipe.train_loader.microbatch_size
    if recipe.parallelism:
        out["parallelism_config"] = dict(recipe.parallelism)
    if recipe.compile:
        out["compile_config"] = {}
    return out


def release(trainer) -> None:
    """Close the Trainer (loggers flushed) and drop what Composer and torch keep of it."""
    trainer.close()
    atexit.unregister(trainer.engine._close)  # the hook holds the state: model, optimizer
    try:
        from torch.distributed.checkpoint import state_dict as dcp_state_dict

        dcp_state_dict._get_fqns.cache_clear()  # keyed by the model: holds it
    except (ImportError, AttributeError):
        pass


def sum_over_ranks(value: float) -> float:
    """`value` summed over every rank (each rank counts its own batches' tokens)."""
    return sum(dist_utils.all_gather_object(value))


def max_over_ranks(value: float) -> float:
    return max(dist_utils.all_gather_object(value))


# ---------------------------------------------------------------- sharded (FSDP) state
# Under FSDP each rank holds a shard: Composer clears the optimizer's state when it wraps the
# model (so moments restored before the Trainer exist would be dropped), and a rank-0-only
# `state_dict()` or forward would wait forever on the other ranks. These go through torch's
# sharding-aware state-dict API instead; on a plain module they give the same dicts (tested on
# the CPU); under FSDP every rank must call them (collectives).
def _options():
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=dist.is_available() and dist.is_initialized())


def restore_moments(trainer, optimizer, state: dict) -> None:
    """Put a probe state's AdamW moments into the Trainer's (possibly sharded) optimizer."""
    import torch
    from torch.distributed.checkpoint import state_dict as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model = trainer.state.model
    full = StateDictOptions(full_state_dict=True)
    osd = dcp.get_optimizer_state_dict(model, optimizer, options=full)  # its groups, by parameter name
    osd["state"] = {f"lm.{n}": {"step": torch.tensor(float(state["step"][n])), "exp_avg": state["exp_avg"][n],
                                "exp_avg_sq": state["exp_avg_sq"][n]} for n in state["exp_avg"]}
    dcp.set_optimizer_state_dict(model, optimizer, osd, options=full)


def full_state(trainer, optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) of the whole LM, keyed by its own parameter names;
    gathered to rank 0's CPU when distributed."""
    from torch.distributed.checkpoint import state_dict as dcp

    model, opts = trainer.state.model, _options()
    msd = dcp.get_model_state_dict(model, options=opts)
    osd = dcp.get_optimizer_state_dict(model, optimizer, options=opts)
    return ({k.removeprefix("lm."): v for k, v in msd.items()},
            {"state": {k.removeprefix("lm."): v for k, v in osd.get("state", {}).items()},
             "param_groups": osd.get("param_groups", [])})


def probe_state_from_full(lm, model_state: dict, optim_state: dict, *, stage: int, grad_clip_norm: float) -> dict:
    """The probe-state dict of curation/oracle/probes.py::probe_state_from_optimizer, from
    `full_state`'s dicts (torch AdamW, one param group)."""
    g0, st = optim_state["param_groups"][0], optim_state["state"]
    return {"stage": int(stage), "model_type": lm.config.model_type, "model_config": lm.config.to_dict(),
            "model": {k: v.detach().cpu().clone() for k, v in model_state.items()},
            "exp_avg": {n: s["exp_avg"].detach().cpu().clone() for n, s in st.items()},
            "exp_avg_sq": {n: s["exp_avg_sq"].detach().cpu().clone() for n, s in st.items()},
            "step": {n: float(s["step"]) for n, s in st.items()},
            "hparams": {"lr": float(g0["lr"]), "betas": [float(b) for b in g0["betas"]], "eps": float(g0["eps"]),
                        "weight_decay": float(g0["weight_decay"]), "grad_clip_norm": float(grad_clip_norm),
                        "decoupled": False}}
