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
