"""Device and process-group helpers over Composer's `dist` (works with 1 or N processes).

Under the Composer launcher (`composer -n 2 ...`) the environment carries RANK / WORLD_SIZE and
the process group uses gloo on the CPU, NCCL on GPUs. Only rank 0 writes shared outputs.
"""
from __future__ import annotations

import os

import torch

from schemas.errors import MatesError


def device_name(requested: str) -> str:
    if requested == "gpu" and not torch.cuda.is_available():
        raise MatesError("`device` is 'gpu' but no CUDA device is visible; use 'auto' or 'cpu'.")
    if requested == "gpu" or (requested == "auto" and torch.cuda.is_available()):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def composer_device(name: str):
    from composer.devices import DeviceCPU, DeviceGPU

    return DeviceGPU() if name.startswith("cuda") else DeviceCPU()


def precision(recipe, device: str) -> str:
    if not device.startswith("cuda"):
        return "fp32"  # Composer on the CPU is fp32 only
    return "amp_bf16" if recipe.precision == "auto" else recipe.precision


def init(requested_device: str, timeout_s: float = 600.0) -> None:
    """Start the process group when launched with more than one process.

    `timeout_s` (the recipe's `dist_timeout_s`) bounds every collective: only ones the ranks reach
    together (training's all-reduces, short syncs). A long phase on one rank (a boundary's
    curation, a checkpoint upload) is waited on through a marker in the store instead."""
    from composer.utils import dist

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world > 1 and device_name(requested_device) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N ranks x all cores each oversubscribes the CPU, and spinning OpenMP threads then
        # slow every rank down many times over: give each rank its share of the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.initialize_dist(composer_device(device_name(requested_device)), timeout=timeout_s)


def rank() -> int:
    from composer.utils import dist

    return dist.get_global_rank()


def world_size() -> int:
    from composer.utils import dist

    return dist.get_world_size()


def barrier() -> None:
    from composer.utils import dist

    if dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    from composer.utils import dist

    return dist.all_gather_object(obj) if dist.get_world_size() > 1 else [obj]


def ranks():
    """This process's ranks as curation/'s plain `Ranks` (ingest and other data-parallel jobs)."""
    from curation.data.ranks import Ranks

    return Ranks(rank=rank(), world_size=world_size(), all_gather=all_gather_object, barrier=barrier)
