"""The recipe's `loggers` and `callbacks` sections -> Composer objects, built by name.

The names are llm-foundry's (its registry maps them to the same Composer classes), so a
foundry YAML's `loggers: {wandb: {project: x}}` or `callbacks: {lr_monitor: {}}` block means
the same here. Each stage's Trainer gets fresh instances (a Trainer closes its loggers when it
is released); names and packages are checked at recipe validation (schemas/training_keys.py).

The file logger writes one file per stage: its `filename` must hold `{run_name}`, which each
stage's Trainer sets to `<run folder name>-stage-<k>`.
"""
from __future__ import annotations

import importlib

from schemas.errors import MatesError

LOGGER_CLASSES = {"file": "composer.loggers:FileLogger", "console": "composer.loggers:ConsoleLogger",
                  "tensorboard": "composer.loggers:TensorboardLogger", "wandb": "composer.loggers:WandBLogger",
                  "mlflow": "composer.loggers:MLFlowLogger"}
CALLBACK_CLASSES = {"lr_monitor": "composer.callbacks:LRMonitor", "memory_monitor": "composer.callbacks:MemoryMonitor",
                    "speed_monitor": "composer.callbacks:SpeedMonitor"}


def _build(section: str, name: str, path: str, kwargs: dict | None):
    module, cls = path.split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**(kwargs or {}))
    except TypeError as exc:  # an argument the class does not take
        raise MatesError(f"`{section}.{name}` has an argument {cls} does not take: {exc}.") from exc
    except ImportError as exc:  # Composer's MissingConditionalImportError is one; validation checks
        # the logger packages first (schemas/training_keys.py), so this is a package's own import
        raise MatesError(f"`{section}.{name}` could not be built: {str(exc).splitlines()[0][:200]}") from exc


def build_loggers(blocks: dict) -> list:
    return [_build("loggers", name, LOGGER_CLASSES[name], kwargs) for name, kwargs in blocks.items()]


def build_callbacks(blocks: dict) -> list:
    return [_build("callbacks", name, CALLBACK_CLASSES[name], kwargs) for name, kwargs in blocks.items()]
