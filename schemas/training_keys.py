"""Checks of the recipe keys that shape training: model extras, micro-batching, parallelism,
compile, loggers and callbacks; and the checks that need the world (ranks, device) at launch.

Each refusal is one line naming the key, the constraint and the value seen. Called from
schemas/recipe.py's validation (`check`) and by the stage loop before any work (`check_world`).
"""
from __future__ import annotations

import importlib.util

from schemas.errors import MatesError

# A trained BPE stays under this many entries; a loaded tokenizer.json may be larger (uint32 pool).
MAX_VOCAB = 262_144
UINT16_VOCAB = 65_536  # up to this many entries the pool stores uint16 tokens, above it uint32

# Composer's logger destinations and callbacks by the names llm-foundry's YAML uses; the value is
# the package a logger needs beyond Composer (None: none). Built in training/plugins.py.
LOGGERS = {"file": None, "console": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
CALLBACKS = ("lr_monitor", "memory_monitor", "speed_monitor")
PARALLELISM = ("fsdp",)


def _require(cond: bool, key: str, constraint: str, value) -> None:
    if not cond:
        raise MatesError(f"`{key}` must be {constraint}; got {value!r}.")


def token_dtype(vocab_size: int) -> str:
    """The pool's token dtype for a vocabulary of `vocab_size` entries."""
    return "uint16" if vocab_size <= UINT16_VOCAB else "uint32"


def _check_model(m) -> None:
    if m.n_kv_heads is not None:
        _require(m.n_kv_heads >= 1 and m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
                 f"a divisor of model.n_heads={m.n_heads}", m.n_kv_heads)
        _require(m.name == "llama", "model.n_kv_heads", "null unless model.name is 'llama' "
                 "(grouped-query heads)", m.n_kv_heads)
    if m.d_ff is not None:
        _require(m.d_ff >= 1, "model.d_ff", ">= 1", m.d_ff)
    _require(m.rope_theta > 0, "model.rope_theta", "> 0", m.rope_theta)


def _check_plugins(section: str, blocks: dict, allowed) -> None:
    for name, kwargs in blocks.items():
        if name not in allowed:
            raise MatesError(f"`{section}.{name}` is not a known {section[:-1]}; allowed: {', '.join(allowed)}.")
        _require(kwargs is None or isinstance(kwargs, dict), f"{section}.{name}", "a mapping of "
                 "constructor arguments (or null)", kwargs)
    for name in blocks if section == "loggers" else ():
        package = LOGGERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise MatesError(f"`loggers.{name}` needs the package `{package}`, which is not installed; "
                             f"`pip install {package}` or remove the block.")
    filename = (blocks.get("file") or {}).get("filename", "{run_name}") if section == "loggers" else "{run_name}"
    _require(isinstance(filename, str) and "{run_name}" in filename, "loggers.file.filename",
             "a path containing {run_name} (one file per stage: <run name>-stage-<k>)", filename)


def check(recipe) -> None:
    """Recipe-time checks (no world, no device needed)."""
    _check_model(recipe.model)
    tl = recipe.train_loader
    if tl.num_workers is not None:
        _require(tl.num_workers >= 0, "train_loader.num_workers", ">= 0", tl.num_workers)
    if isinstance(tl.microbatch_size, int):
        _require(tl.microbatch_size >= 1, "train_loader.microbatch_size", ">= 1 or 'auto'", tl.microbatch_size)
    _check_plugins("loggers", recipe.loggers, list(LOGGERS))
    _check_plugins("callbacks", recipe.callbacks, CALLBACKS)
    for name, block in recipe.parallelism.items():
        _require(name in PARALLELISM, f"parallelism.{name}", f"one of {', '.join(PARALLELISM)}", name)
        _require(isinstance(block, dict), f"parallelism.{name}", "a mapping of FSDPConfig keys", block)


def check_world(recipe, world_size: int, device: str) -> None:
    """Launch-time checks: the global batch splits evenly over the ranks; CUDA-only keys off CPU."""
    tl = recipe.train_loader
    _require(tl.batch_size % world_size == 0, "train_loader.batch_size",
             f"a multiple of the {world_size} ranks (the global batch is split evenly over them)",
             tl.batch_size)
    per_rank = tl.batch_size // world_size
    if isinstance(tl.microbatch_size, int):
        _require(per_rank % tl.microbatch_size == 0, "train_loader.microbatch_size",
                 f"a divisor of the per-rank batch {per_rank} (train_loader.batch_size / {world_size} ranks)",
                 tl.microbatch_size)
    cuda = device.startswith("cuda")
    _require(cuda or tl.microbatch_size != "auto", "train_loader.microbatch_size",
             "an int on the CPU ('auto' searches CUDA out-of-memory errors)", tl.microbatch_size)
    _require(cuda or not recipe.parallelism, "parallelism",
             "empty on the CPU (FSDP shards over CUDA devices; the CPU runs DDP over gloo)", recipe.parallelism)
