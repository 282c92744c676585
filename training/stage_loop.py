"""The stage loop (`mates run`): staged Composer pretraining with curation at every boundary.

For stage k = 0..K-1:
  1. curation (every rank its share of the oracle, the scoring and the stage index; rank 0 fits and selects): unless `stages/k/_SUCCESS` exists, run the recipe's method (stage 0:
     `random`, there is no trained model yet) on stage k's candidate pool, from the model state at
     the end of stage k-1, and commit `stages/k/` (index, streams, selection, _SUCCESS);
  2. training: a Composer Trainer on stage k's streams for `stages.batches[k]` batches, starting
     from the state saved at the end of stage k-1 (weights, AdamW moments, step, timestamp);
  3. evaluation (rank 0) of every eval set -> rows of `<run>/metrics.parquet`; then the state is committed:
     `checkpoints/stage-k-state.pt` (weights_only-loadable, see schemas/probe_state.py) and
     Composer's own `checkpoints/stage-k.pt`.

Why one Trainer per stage rather than one Trainer whose `fit(train_dataloader=..., duration=...)`
is called K times: a run that resumes after a kill must continue exactly as an uninterrupted one.
Restoring every stage from the committed state makes both the same code path, so the resume test
checks the path every run takes. Composer's schedulers are functions of `state.timestamp`; the
restored timestamp, the LambdaLR stepped there (trainer_parts.restore_timestamp: Composer built it
at t = 0) and an explicit `t_max` (the whole run) keep the LR schedule continuous. After its state
is committed, a stage's Trainer is released (trainer_parts.release) before the next curation.

Resume. A stage whose state file exists is done and skipped; a stage with `_SUCCESS` is never
recomputed; a stage without it is redone from scratch. The state file loads with
`weights_only=True` (no pickled code is executed on resume or when probing).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
import warnings

import pyarrow as pa
import torch

from curation.compute import shape_of, training_flops
from curation.data.ingest import read_pool_marker
from curation.data.sets import resolve_primary_eval, resolve_target
from curation.data.tokenizer import EOS, load_pool_tokenizer
from curation.store.stage_index import read_stage_streams, stage_committed, stage_url
from curation.methods.base import StageContext
from curation.oracle.probes import probe_state_from_optimizer
from curation.select.candidates import candidate_pools, choose_mode
from curation.stage_job import n_selected, run_stage_job
from curation.store import shard_cache
from curation.store.catalog import catalog_columns
from curation.store.pool import shard_samples
from schemas import bounds, tables, training_keys
from schemas.errors import MatesError
from schemas.probe_state import load_probe_state, save_probe_state
from schemas.method_options import RandomOptions
from schemas.recipe import Recipe, dump_recipe, load_recipe, method_options_key
from schemas.storage import export_endpoint_for_streaming, join, read_parquet, store_for, write_parquet
from training import dist_utils, trainer_parts
from training.callbacks import StageMonitor
from training.data import mds_loader, streaming_dataset
from training.evaluation import evaluate, load_eval_sets
from training.model import build_causal_lm, composer_model

warnings.filterwarnings("ignore", message=".*warmup duration is 0.*")


def state_name(stage: int) -> str:
    return f"stage-{stage}-state.pt"


# ---------------------------------------------------------------- optimizer, scheduler, state
def build_optimizer(lm: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optimizer
    return torch.optim.AdamW(lm.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def build_scheduler(recipe: Recipe):
    from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                                LinearWithWarmupScheduler)

    s, total = recipe.scheduler, f"{recipe.total_batches}ba"
    if s.name == "constant":
        return ConstantWithWarmupScheduler(t_warmup=f"{s.t_warmup}ba", t_max=total)
    if s.name == "linear_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=f"{s.t_warmup}ba", alpha_f=s.alpha_f, t_max=total)
    return CosineAnnealingWithWarmupScheduler(t_warmup=f"{s.t_warmup}ba", t_max=total, alpha_f=s.alpha_f)


def restore_state(lm, optimizer, state: dict) -> None:
    """Load weights and AdamW moments of a state file into a fresh model and optimizer."""
    lm.load_state_dict(state["model"])
    device = next(lm.parameters()).device
    for name, p in lm.named_parameters():
        if name in state["exp_avg"]:
            # clones: AdamW updates its moments in place, and the loaded state must stay as saved
            optimizer.state[p] = {"step": torch.tensor(state["step"][name]),
                                  "exp_avg": state["exp_avg"][name].to(device, copy=True),
                                  "exp_avg_sq": state["exp_avg_sq"][name].to(device, copy=True)}


# ---------------------------------------------------------------- run set-up
class RunContext:
    """What every stage of a run shares: recipe, pool facts, candidate pools, eval sets; and the
    checks of recipe keys that need the pool (target, eval.primary, stages.audit_by)."""

    def __init__(self, recipe: Recipe, log):
        self.recipe, self.log = recipe, log
        export_endpoint_for_streaming()
        self.pool_marker = read_pool_marker(recipe.data)
        self.tokenizer = load_pool_tokenizer(recipe.data)
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self.vocab_size = self.tokenizer.get_vocab_size()
        if self.pool_marker["seq_len"] > recipe.model.max_seq_len:
            raise MatesError(f"`model.max_seq_len` is {recipe.model.max_seq_len} but the pool at "
                             f"{recipe.data} holds sequences of up to {self.pool_marker['seq_len']} tokens.")
        st = recipe.stages
        sizes = shard_samples(join(recipe.data, "pool"))
        plan = {"count": st.count, "per_stage": st.pool_per_stage, "seed": recipe.seed}
        self.candidate_mode = choose_mode(sizes, **plan, mode=_resumed_mode(recipe))
        self.pools = candidate_pools(sizes, **plan, mode=self.candidate_mode)
        shard_cache.set_limit(st.cache_limit)
        self.device = dist_utils.device_name(recipe.device)
        self.target = None
        if hasattr(recipe.method_options, "target"):
            self.target = resolve_target(self.pool_marker, recipe.method_options.target,
                                         f"{method_options_key(st)}.target", recipe.data)
        self.primary_eval = resolve_primary_eval(self.pool_marker, recipe.eval.primary, "eval.primary", recipe.data)
        check_audit_column(recipe.data, st.audit_by)
        self.run_store = store_for(recipe.run)
        self.ckpt_store = store_for(recipe.checkpoint_url)

    @functools.cached_property
    def eval_sets(self):
        """Read on first evaluation only: `mates curate` never touches an eval set."""
        r = self.recipe
        return load_eval_sets(r.data, self.pool_marker, pad_id=self.eos_id, batch_size=r.eval.batch_size,
                              max_examples=r.eval.max_examples, device=self.device)
    def expected_train_seconds(self, stage: int) -> float | None:
        """Stage `stage`'s training seconds as the previous stage's rate predicts them (None: unknown)."""
        if stage < 1 or not self.run_store.exists("metrics.parquet"):
            return None
        rows = {r["stage"]: r for r in read_parquet(self.recipe.run, "metrics.parquet").to_pylist()}
        prev = rows.get(stage - 1)
        if prev is None or prev["train_seconds"] <= 0:
            return None
        return prev["train_seconds"] / self.recipe.stage_batches[stage - 1] * self.recipe.stage_batches[stage]

    def stage_context(self, stage: int) -> StageContext:
        r = self.recipe
        state_url = join(r.checkpoint_url, state_name(stage - 1)) if stage > 0 else None
        return StageContext(run_url=r.run, data_url=r.data, stage=stage, candidates=self.pools[stage],
                            train_seconds_expected=self.expected_train_seconds(stage),
                            n_select=n_selected(len(self.pools[stage]), r.stages.selection_ratio if stage > 0
                                               else r.stages.warmup_ratio),
                            seed=r.seed, options=r.method_options if stage > 0 else RandomOptions(),
                            state_url=state_url, device=self.device, log=self.log,
                            target=self.target if stage > 0 else None, audit_by=r.stages.audit_by,
                            # how the candidates were drawn (`auto` resolved), for whoever reads the marker
                            metrics={"candidates_mode": self.candidate_mode})


def _resumed_mode(recipe: Recipe) -> str:
    """`stages.candidates`, but `samples` for a run begun before the key existed (its saved
    recipe.yaml lacks it): `auto` could draw its later stages by shard."""
    store = store_for(recipe.run)
    if store.exists("recipe.yaml") and "candidates" not in (bounds.load_yaml(
            store.read_bytes("recipe.yaml"), "recipe.yaml").get("stages") or {}):
        return "samples"
    return recipe.stages.candidates


def _commit_recipe(recipe: Recipe) -> None:
    """Save the resolved recipe; a run folder already holding another recipe is refused."""
    store = store_for(recipe.run)
    text = dump_recipe(recipe)
    if store.exists("recipe.yaml"):
        saved = load_recipe(store.read_bytes("recipe.yaml").decode())

        def settings(r: Recipe) -> dict:  # a run copied or moved elsewhere is the same run
            return r.to_dict() | {"run": None, "save_folder": None}

        if settings(saved) != settings(recipe):
            raise MatesError(f"`run` {recipe.run!r} already holds a run of another recipe; choose a new "
                             f"`run` URL (or delete that folder).")
        return
    store.write_bytes(text.encode(), "recipe.yaml")


def _append_metrics(run_url: str, stage: int, evals: list[dict], common: dict) -> None:
    """Replace the rows of `stage` in metrics.parquet (one per eval set; rewritten atomically)."""
    store = store_for(run_url)
    rows = read_parquet(run_url, "metrics.parquet").to_pylist() if store.exists("metrics.parquet") else []
    rows = [{"train_flops": None, **r} for r in rows if r["stage"] != stage] + \
        [{"stage": stage, **common, **e} for e in evals]  # rows from before the ledger: no train_flops
    rows.sort(key=lambda r: r["stage"])  # stable: eval sets keep their order within a stage
    write_parquet(tables.conform(pa.Table.from_pylist(rows), tables.METRICS), run_url, "metrics.parquet")


# ---------------------------------------------------------------- one stage
def train_stage(ctx: RunContext, stage: int, *, in_memory: list[dict] | None = None) -> dict:
    """Train stage `stage` from the state at the end of stage-1; return timing and the state."""
    from composer import Trainer
    from composer.algorithms import GradientClipping

    r, rank = ctx.recipe, dist_utils.rank()
    lm = build_causal_lm(r.model, ctx.vocab_size, ctx.eos_id, seed=r.seed).to(ctx.device)
    shape = shape_of(lm, context=r.model.max_seq_len)  # before any sharding wraps its parameters
    optimizer = build_optimizer(lm, r)
    start = {"batch": 0, "sample": 0, "token": 0}
    if stage > 0:
        prev = load_probe_state(r.checkpoint_url, state_name(stage - 1))
        restore_state(lm, optimizer, prev)
        start = prev["timestamp"]
    per_rank = r.train_loader.batch_size // dist_utils.world_size()  # check_world: it divides
    if in_memory is not None:  # throughput comparison: the same samples as tensors
        from training.data import InMemorySamples
        dataset = InMemorySamples(in_memory)
    else:
        marker = store_for(stage_url(r.run, stage)).read_bytes("_SUCCESS")
        dataset = streaming_dataset(read_stage_streams(r.run, stage, decommit_damaged=rank == 0), batch_size=per_rank,
                                    shuffle=r.train_loader.shuffle, seed=r.seed + stage,
                                    cache_tag=hashlib.sha1(marker).hexdigest())
    loader = mds_loader(dataset, batch_size=per_rank, pad_id=ctx.eos_id, num_workers=trainer_parts.num_workers(r))
    monitor = StageMonitor(stage=stage, log=ctx.log, rank=rank, interval=max(1, r.stage_batches[stage] // 5))
    end_batch = start["batch"] + r.stage_batches[stage]
    algorithms = [GradientClipping(clipping_type="norm", clipping_threshold=r.grad_clip_norm)] \
        if r.grad_clip_norm > 0 else []
    options = trainer_parts.trainer_options(r, ctx.device, stage)
    trainer = Trainer(model=composer_model(lm), train_dataloader=loader, max_duration=f"{end_batch}ba",
                      optimizers=optimizer, schedulers=build_scheduler(r), algorithms=algorithms,
                      device=dist_utils.composer_device(ctx.device), precision=dist_utils.precision(r, ctx.device),
                      seed=r.seed + 1000 * stage, callbacks=[monitor, *options.pop("callbacks")], progress_bar=False,
                      log_to_console=False, spin_dataloaders=False, step_schedulers_every_batch=True, **options)
    trainer_parts.restore_timestamp(trainer, start)  # after the constructor built the LambdaLR
    if stage > 0 and r.parallelism:  # FSDP: Composer cleared the moments restored above
        trainer_parts.restore_moments(trainer, optimizer, prev)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = trainer_parts.max_over_ranks(time.perf_counter() - t0)
    tokens = int(trainer_parts.sum_over_ranks(monitor.tokens))  # each rank counted its own batches
    ts = trainer.state.timestamp
    timestamp = {"batch": int(ts.batch), "sample": int(ts.sample), "token": int(start["token"]) + tokens}
    out = {"trainer": trainer, "lm": lm, "optimizer": optimizer, "timestamp": timestamp, "eval_lm": lm,
           "seconds": seconds, "tokens_per_s": tokens / max(trainer_parts.max_over_ranks(monitor.seconds), 1e-9),
           "flops": training_flops(shape, tokens)}
    if r.parallelism:  # sharded: gather the whole state on every rank; rank 0 evaluates an unsharded copy
        out["full"] = trainer_parts.full_state(trainer, optimizer)
        if rank == 0:
            out["eval_lm"] = build_causal_lm(r.model, ctx.vocab_size, ctx.eos_id, seed=r.seed)
            out["eval_lm"].load_state_dict(out["full"][0])
            out["eval_lm"].to(ctx.device)
    return out


def _commit_stage_state(ctx: RunContext, stage: int, trained: dict) -> None:
    """Rank 0 writes Composer's checkpoint, then the state file that marks the stage trained."""
    with tempfile.TemporaryDirectory(prefix="mates-ckpt-") as tmp:
        path = os.path.join(tmp, f"stage-{stage}.pt")
        trained["trainer"].save_checkpoint(path)
        if dist_utils.rank() == 0:
            ctx.ckpt_store.put_file(path, f"stage-{stage}.pt")
            if "full" in trained:  # FSDP: the gathered whole state, not this rank's shard
                state = trainer_parts.probe_state_from_full(trained["lm"], *trained["full"], stage=stage,
                                                            grad_clip_norm=ctx.recipe.grad_clip_norm)
            else:
                state = probe_state_from_optimizer(trained["lm"], trained["optimizer"], stage=stage,
                                                   grad_clip_norm=ctx.recipe.grad_clip_norm)
            state["timestamp"] = trained["timestamp"]  # where the next stage's schedule resumes
            save_probe_state(state, ctx.recipe.checkpoint_url, state_name(stage))
    trainer_parts.release(trained["trainer"])


def curate_if_needed(ctx: RunContext, stage: int) -> float:
    """Every rank calls this: rank 0 fits and selects, every rank probes, scores and writes its share."""
    if stage_committed(ctx.recipe.run, stage):
        return 0.0
    method = ctx.recipe.stages.method if stage > 0 else "random"
    t0 = time.perf_counter()
    rank = dist_utils.rank()
    if rank == 0:
        ctx.log(f"stage {stage}: curating {len(ctx.pools[stage])} candidates ({ctx.candidate_mode}) "
                f"with `{method}`")
    try:
        run_stage_job(ctx.stage_context(stage), method, rank=rank, world_size=dist_utils.world_size(),
                      barrier=dist_utils.barrier)
    finally:  # the boundary's pool shards go with it: the next stage reads other shards
        shard_cache.shared_cache().release()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the loop
def run_recipe(recipe: Recipe, log=print, until_stage: int | None = None) -> None:
    """Train every stage (or stages 0..`until_stage`), curating at each boundary; resumable."""
    last = recipe.stages.count - 1 if until_stage is None else until_stage
    if not 0 <= last < recipe.stages.count:
        raise MatesError(f"`--until-stage` must be in [0, {recipe.stages.count - 1}]; got {until_stage}.")
    dist_utils.init(recipe.device, timeout_s=recipe.dist_timeout_s)
    training_keys.check_world(recipe, dist_utils.world_size(), dist_utils.device_name(recipe.device))
    ctx = RunContext(recipe, log)
    rank = dist_utils.rank()
    if rank == 0:
        _commit_recipe(recipe)
    dist_utils.barrier()
    for stage in range(last + 1):
        if ctx.ckpt_store.exists(state_name(stage)):
            log(f"stage {stage}: already trained (state committed); skipping")
            continue
        curation_seconds = curate_if_needed(ctx, stage)
        if rank != 0:  # rank 0 commits the boundary; polled, not a barrier (no collective clock)
            ctx.run_store.wait_for("stages", str(stage), "_SUCCESS")
        if stage == 0 and rank == 0:
            initial = build_causal_lm(recipe.model, ctx.vocab_size, ctx.eos_id, seed=recipe.seed).to(ctx.device)
            _append_metrics(recipe.run, -1, evaluate(initial, ctx.eval_sets),
                            {"batches_seen": 0, "tokens_seen": 0, "train_tokens_per_s": 0.0,
                             "curation_seconds": 0.0, "train_seconds": 0.0, "train_flops": 0.0})
            del initial
        log(f"stage {stage}: training {recipe.stage_batches[stage]} batches")
        trained = train_stage(ctx, stage)
        if rank == 0:
            evals = evaluate(trained["eval_lm"], ctx.eval_sets)
            _append_metrics(recipe.run, stage, evals,
                            {"batches_seen": trained["timestamp"]["batch"],
                             "tokens_seen": trained["timestamp"]["token"],
                             "train_tokens_per_s": trained["tokens_per_s"],
                             "curation_seconds": curation_seconds, "train_seconds": trained["seconds"],
                             "train_flops": trained["flops"]})
            losses = ", ".join(f"{e['eval_set']} ({e['loss_kind']}) {e['loss']:.4f}" for e in evals)
            log(f"stage {stage}: eval loss {losses}; {trained['tokens_per_s']:,.0f} tokens/s")
        _commit_stage_state(ctx, stage, trained)
        del trained  # the last holder of this stage's model and optimizer: freed before curation
        if rank != 0:  # rank 0 uploads the checkpoint and the state file (any size, any time)
            ctx.ckpt_store.wait_for(state_name(stage))
    if rank == 0:
        log(metrics_table(recipe.run))
        log(costs_table(recipe.run))


def metrics_table(run_url: str) -> str:
    """The console table: one row per stage, one loss column per eval set (`*`: cloze kind)."""
    rows = read_parquet(run_url, "metrics.parquet").to_pylist()
    kinds = {r["eval_set"]: r["loss_kind"] for r in rows}
    names = list(kinds)
    labels = [n + ("*" if kinds[n] == "cloze" else "") for n in names]
    width = max([10] + [len(label) for label in labels])
    head = f"{'stage':>5} {'batches':>8} {'tokens':>10} " + " ".join(f"{n:>{width}}" for n in labels) + \
        f" {'tok/s':>8} {'curate s':>8} {'train s':>8} {'share':>6}"
    lines = ["eval loss per set (* = cloze: the target word only)", head]
    for st in tables.metrics_by_stage(rows):
        cells = " ".join(f"{st['loss'].get(n, float('nan')):>{width}.4f}" for n in names)
        lines.append(f"{st['stage']:>5} {st['batches_seen']:>8} {st['tokens_seen']:>10} {cells} "
                     f"{st['train_tokens_per_s']:>8.0f} {st['curation_seconds']:>8.1f} {st['train_seconds']:>8.1f} "
                     f"{_share(st['curation_seconds'], st['train_seconds']):>6}")
    return "\n".join(lines)


def _share(curation: float, train: float) -> str:
    return f"{curation / train:.2f}x" if train > 0 else "-"


def costs_table(run_url: str) -> str:
    """Curation seconds per phase per committed stage (from each `_SUCCESS`), next to training."""
    from curation.store.run_views import committed_stages
    from schemas.costs import PHASES, stage_costs

    train = {r["stage"]: r["train_seconds"] for r in read_parquet(run_url, "metrics.parquet").to_pylist()} \
        if store_for(run_url).exists("metrics.parquet") else {}
    head = f"{'stage':>5} " + " ".join(f"{p:>8}" for p in PHASES) + f" {'curation':>8} {'train s':>8} {'share':>6}"
    lines = ["curation seconds per phase (embed: new embeddings only; other: the rest of the job)", head]
    for k in committed_stages(run_url):
        costs = stage_costs(json.loads(store_for(stage_url(run_url, k)).read_bytes("_SUCCESS")))
        t = train.get(k, 0.0)
        lines.append(f"{k:>5} " + " ".join(f"{costs[p]:>8.2f}" for p in PHASES) +
                     f" {costs['total']:>8.2f} {t:>8.1f} {_share(costs['total'], t):>6}")
    return "\n".join(lines)


def check_audit_column(data_url: str, column: str) -> None:
    """`stages.audit_by` must name a catalog column (read from the catalog's footer alone)."""
    names = catalog_columns(data_url)
    if column not in names:
        raise MatesError(f"`stages.audit_by` must be a catalog column ({', '.join(names)}); got {column!r}.")


def curate_stage(run_url: str, stage: int, *, force: bool = False, log=print) -> None:
    """`mates curate`: one boundary's job on its own, from the run's saved recipe."""
    store = store_for(run_url)
    if not store.exists("recipe.yaml"):
        raise MatesError(f"`--run` {run_url!r} holds no recipe.yaml; start it with `mates run`.")
    recipe = load_recipe(store.read_bytes("recipe.yaml").decode(), {"run": run_url})  # it may have moved
    if not 0 <= stage < recipe.stages.count:
        raise MatesError(f"`--stage` must be in [0, {recipe.stages.count - 1}]; got {stage}.")
    ctx = RunContext(recipe, log)
    if stage > 0 and not ctx.ckpt_store.exists(state_name(stage - 1)):
        raise MatesError(f"stage {stage} needs the state at the end of stage {stage - 1}, which "
                         f"{recipe.checkpoint_url} does not hold yet.")
    if force:
        store_for(stage_url(run_url, stage)).remove("_SUCCESS")
    seconds = curate_if_needed(ctx, stage)
    log(f"stage {stage}: curation {'done' if seconds else 'already committed'} ({seconds:.1f} s)")
