"""One stage's Trainer: the lr it starts at, what it is given (loggers, callbacks), what it
leaves behind before curation, and the launch-time checks of the world (issue 23, bugs 1, 2, 4, 5;
bug 3, tokens over ranks, is in test_stage_loop's two-process test)."""
from __future__ import annotations

import gc
import math
import re
import weakref

import pytest

from schemas.errors import MatesError
from schemas.recipe import load_recipe
from tests.conftest import MICRO_RECIPE

LR, WARMUP, ALPHA_F, BATCHES = 3.0e-3, 4, 0.1, [6, 4]  # the micro recipe's schedule, 10 batches


def schedule(t: int) -> float:
    """Composer's cosine-with-warmup at batch t over the whole run (t_max = 10 batches)."""
    if t < WARMUP:
        return LR * t / WARMUP
    frac = (t - WARMUP) / (sum(BATCHES) - WARMUP)
    return LR * (ALPHA_F + (1 - ALPHA_F) * (1 + math.cos(math.pi * frac)) / 2)


def logged(path) -> dict[str, dict[int, float]]:
    """A Composer FileLogger file -> {metric: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for step, name, value in re.findall(r"\[metric\]\[batch=(\d+)\]: (\S+): (\S+)", path.read_text()):
        out.setdefault(name, {})[int(step)] = float(value)
    return out


@pytest.fixture(scope="module")
def staged_run(local_pool, tmp_path_factory):
    """The micro recipe in two stages (6 + 4 batches) with a file logger and lr_monitor, run in
    this process with spies: which training objects are still alive when each curation starts."""
    from training import stage_loop

    tmp = tmp_path_factory.mktemp("staged")
    recipe = load_recipe(MICRO_RECIPE, {
        "data": local_pool, "run": str(tmp / "run"), "stages.batches": BATCHES, "callbacks": {"lr_monitor": {}},
        "loggers": {"file": {"filename": str(tmp / "logs" / "{run_name}-rank{rank}.txt")}}})
    refs, alive = [], {}
    train, curate = stage_loop.train_stage, stage_loop.curate_if_needed

    def spy_train(ctx, stage, **kw):
        out = train(ctx, stage, **kw)
        refs.append({k: weakref.ref(out[k]) for k in ("trainer", "lm", "optimizer")})
        return out

    def spy_curate(ctx, stage):
        gc.collect()
        alive[stage] = [k for k, ref in (refs[-1] if refs else {}).items() if ref() is not None]
        return curate(ctx, stage)

    stage_loop.train_stage, stage_loop.curate_if_needed = spy_train, spy_curate
    try:
        stage_loop.run_recipe(recipe, log=lambda line: None)
    finally:
        stage_loop.train_stage, stage_loop.curate_if_needed = train, curate
    return tmp, alive


def test_every_batch_trains_at_the_lr_of_one_uninterrupted_schedule(staged_run):
    """Composer steps the scheduler at the end of batch b before advancing the timestamp, so batch
    b trains at schedule(b - 1) in an uninterrupted run; stage 1's first batch (6) must too, not at
    schedule(0) = 0 (what it got when the LambdaLR was built before the timestamp was restored)."""
    tmp, _ = staged_run
    seen = {}
    for stage in (0, 1):
        seen.update(logged(tmp / "logs" / f"run-stage-{stage}-rank0.txt")["train/lr"])
    # the logger's step is the timestamp after the batch: step s logs batch s - 1; 4 decimals
    got = [seen[s + 1] for s in range(sum(BATCHES))]
    want = [schedule(max(b - 1, 0)) for b in range(sum(BATCHES))]
    assert got == pytest.approx(want, abs=6e-5), list(zip(got, want))
    assert got[6] == pytest.approx(2.8e-3, abs=1e-4)


def test_every_stage_reaches_the_recipe_loggers_and_callbacks(staged_run):
    tmp, _ = staged_run
    for stage, n in enumerate(BATCHES):
        metrics = logged(tmp / "logs" / f"run-stage-{stage}-rank0.txt")
        first = sum(BATCHES[:stage])
        assert sorted(metrics["train/loss"]) == list(range(first + 1, first + n + 1))
        assert len(metrics["lr-AdamW/group0"]) == n  # lr_monitor, built by name
        assert all(v > 0 for v in metrics["train/tokens_seen"].values())


def test_training_objects_are_released_before_curation(staged_run):
    """Stage 0's Trainer, model and optimizer are gone when stage 1's curation starts (they were
    held by the loop's variable, Composer's atexit hook and torch's `_get_fqns` cache)."""
    _, alive = staged_run
    assert alive == {0: [], 1: []}


def test_a_global_batch_the_ranks_do_not_divide_is_refused():
    from schemas.training_keys import check_world

    recipe = load_recipe(MICRO_RECIPE, {"train_loader.batch_size": 16})
    check_world(recipe, 4, "cpu")
    with pytest.raises(MatesError) as err:
        check_world(recipe, 3, "cpu")
    assert str(err.value) == ("`train_loader.batch_size` must be a multiple of the 3 ranks (the global batch "
                              "is split evenly over them); got 16.")
    with pytest.raises(MatesError, match="train_loader.batch_size.*32 ranks"):
        check_world(recipe, 32, "cpu")


@pytest.mark.parametrize("overrides, message", [
    ({"train_loader.microbatch_size": "auto"}, "`train_loader.microbatch_size` must be an int on the CPU"),
    ({"train_loader.microbatch_size": 3}, "`train_loader.microbatch_size` must be a divisor of the per-rank batch 8"),
    ({"parallelism": {"fsdp": {}}}, "`parallelism` must be empty on the CPU"),
])
def test_cuda_only_keys_are_refused_on_the_cpu(overrides, message):
    from schemas.training_keys import check_world

    with pytest.raises(MatesError, match=re.escape(message)):
        check_world(load_recipe(MICRO_RECIPE, overrides), 1, "cpu")
    check_world(load_recipe(MICRO_RECIPE, {"train_loader.microbatch_size": 4}), 1, "cpu")


@pytest.mark.parametrize("overrides, message", [
    ({"loggers": {"wandb": {"project": "x"}}}, "`loggers.wandb` needs the package `wandb`, which is not installed"),
    ({"loggers": {"slack": {}}}, "`loggers.slack` is not a known logger; allowed: file, console, tensorboard"),
    ({"callbacks": {"lr_monitr": {}}}, "`callbacks.lr_monitr` is not a known callback; allowed: lr_monitor"),
    ({"loggers": {"file": {"filename": "log.txt"}}}, "`loggers.file.filename` must be a path containing {run_name}"),
    ({"parallelism": {"tp": {}}}, "`parallelism.tp` must be one of fsdp"),
])
def test_plugin_keys_are_checked_at_validation(overrides, message):
    import importlib.util

    if "wandb" in overrides.get("loggers", {}) and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(MatesError, match=re.escape(message)):
        load_recipe(MICRO_RECIPE, overrides)


def test_a_bad_plugin_argument_is_one_line():
    from training.plugins import build_callbacks

    with pytest.raises(MatesError, match=r"`callbacks.speed_monitor` has an argument SpeedMonitor does not take"):
        build_callbacks({"speed_monitor": {"window": 3}})


def test_sharding_aware_state_equals_the_plain_one():
    """The FSDP path's state dicts (torch.distributed.checkpoint.state_dict), on a plain module:
    the probe state it builds is the plain path's, and restoring moments through it puts back
    exactly the stored ones. (The sharded case itself needs CUDA ranks: not run here.)"""
    from types import SimpleNamespace

    import torch

    from curation.lm.model import build_causal_lm
    from curation.oracle.probes import probe_state_from_optimizer
    from schemas.recipe import ModelConfig
    from training import trainer_parts
    from training.model import composer_model

    cfg = ModelConfig(name="llama", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)

    def trained_pair():
        lm = build_causal_lm(cfg, 50, 0, seed=0)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        return lm, opt, SimpleNamespace(state=SimpleNamespace(model=composer_model(lm)))

    lm, opt, trainer = trained_pair()
    for seed in range(2):
        ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(seed))
        lm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    plain = probe_state_from_optimizer(lm, opt, stage=1, grad_clip_norm=1.0)
    full = trainer_parts.probe_state_from_full(lm, *trainer_parts.full_state(trainer, opt), stage=1, grad_clip_norm=1.0)
    assert full["hparams"] == plain["hparams"] and full["step"] == plain["step"] == {n: 2.0 for n in plain["step"]}
    for key in ("model", "exp_avg", "exp_avg_sq"):
        assert full[key].keys() == plain[key].keys(), key
        for name in plain[key]:
            torch.testing.assert_close(full[key][name], plain[key][name], rtol=0, atol=0)

    lm2, opt2, trainer2 = trained_pair()
    trainer_parts.restore_moments(trainer2, opt2, plain)
    for name, p in lm2.named_parameters():
        torch.testing.assert_close(opt2.state[p]["exp_avg"], plain["exp_avg"][name], rtol=0, atol=0)
        assert float(opt2.state[p]["step"]) == 2.0
