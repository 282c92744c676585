"""What tests/test_stage_ranks.py runs on each of 2 ranks (`python -m tests.stage_ranks_worker DATA
STATE RUNS` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set: a gloo process group, without
the Composer launcher's imports) and in-process as one rank: `run_stage_job` of every curation method in turn,
each on a tiny stage of the micro pool (its own run folder under RUNS), from the micro model's
probe state STATE. Nothing trains: the boundary is the unit under test."""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from curation.methods.base import StageContext
from curation.stage_job import run_stage_job
from schemas import method_options as mo

CANDIDATES = np.arange(0, 240, 2)   # 120 candidates: slices of 60 on 2 ranks
N_SELECT = 40
_ENCODER = dict(encoder_layers=1, encoder_max_len=32, head_epochs=10, batch_size=16, epochs=1)
_ORACLE = dict(probe_method="forward", n_probes=16, probe_batch=8, max_target=4)
_GROUP = dict(n_trajectories=10, trajectory_length=2, trajectory_batch=5, trajectory_reference=2,
              relational_epochs=10, n_clusters=3)
# run name -> (method, its options); `@frozen`: the stored-embedding backbone, which each rank fills
# for its slice (the 2 ranks run first and embed; 1 rank then reads the same embeddings); `@tree`:
# frozen, with the k-means tree's groups dealt to the ranks
METHODS = {
    "random": ("random", mo.RandomOptions()),
    "perplexity": ("perplexity", mo.PerplexityOptions(batch_size=16)),
    "dsir": ("dsir", mo.DsirOptions(max_target=16, n_features=2048)),
    "classifier": ("classifier", mo.ClassifierOptions(max_target=16, n_features=4096, dim=4, epochs=2)),
    "mates": ("mates", mo.MatesOptions(**_ORACLE, **_ENCODER)),
    "mates@frozen": ("mates", mo.MatesOptions(**_ORACLE, **_ENCODER, backbone="frozen")),
    "group_mates": ("group_mates", mo.GroupMatesOptions(**_ORACLE, **_ENCODER, **_GROUP)),
    "group_mates@frozen": ("group_mates", mo.GroupMatesOptions(**_ORACLE, **_ENCODER, **_GROUP, backbone="frozen")),
    # 80 clusters > clustering.BRANCH (64): a k-means tree, whose top-level groups 2 ranks share
    "group_mates@tree": ("group_mates", mo.GroupMatesOptions(**_ORACLE, **_ENCODER, **{**_GROUP, "n_clusters": 80},
                                                             backbone="frozen")),
}


def context(data: str, state_url: str, run_url: str, options) -> StageContext:
    return StageContext(run_url=run_url, data_url=data, stage=1, candidates=CANDIDATES, n_select=N_SELECT, seed=5,
                        options=options, state_url=state_url, target="wiki_en", log=lambda m: None)


def run_all(data: str, state_url: str, runs: str, rank: int, world_size: int, barrier) -> None:
    """Every method's boundary, one after another (each returns once its stage is committed)."""
    torch.set_num_threads(1)   # micro tensors; two ranks share two cores
    for name, (method, options) in METHODS.items():
        run_stage_job(context(data, state_url, os.path.join(runs, name), options), method, rank=rank,
                      world_size=world_size, barrier=barrier)


def main(data: str, state_url: str, runs: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")   # env://, as the launchers set it
    try:
        run_all(data, state_url, runs, dist.get_rank(), dist.get_world_size(), dist.barrier)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
