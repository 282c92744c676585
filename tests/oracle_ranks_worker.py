"""What tests/test_oracle_ranks.py runs on each rank of `composer -n 2 -m tests.oracle_ranks_worker OUT`
(and in-process as one rank): forward probes and trajectories of the micro model dealt to the
ranks, then a part that fails on the last rank, which every rank must report rather than wait."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import torch

from curation.oracle.probes import probe_influence
from curation.oracle.ranks import on_ranks
from curation.oracle.trajectories import run_trajectories
from jobs.bench_probe import toy_probe_state, toy_samples
from schemas.errors import MatesError
from tests.oracle_fixtures import MICRO, VOCAB, ragged_reference

N_PROBES, PROBE_BATCH, N_TRAJ, T, TRAJ_BATCH = 14, 4, 5, 3, 2


def compute_all(out_url: str, rank: int, world_size: int, barrier) -> tuple | None:
    """(probe influence [14], trajectory increments [5, 3]) on rank 0; None on the others."""
    torch.set_num_threads(1)
    state, reference = toy_probe_state(MICRO, VOCAB), ragged_reference(12)
    samples = toy_samples(N_PROBES + N_TRAJ * T, VOCAB, min_len=6, max_len=32)
    length = max(len(s["tokens"]) for s in samples)
    probes, rows = samples[:N_PROBES], [samples[N_PROBES + j * T:N_PROBES + (j + 1) * T] for j in range(N_TRAJ)]

    def probe_part(lo: int, hi: int) -> pa.Table:
        return pa.table({"influence": probe_influence(state, reference, probes[lo:hi], method="forward",
                                                      probe_batch=PROBE_BATCH, pad_id=0, length=length)})

    def trajectory_part(lo: int, hi: int) -> pa.Table:
        values = run_trajectories(state, reference, rows[lo:hi], pad_id=0, batch=TRAJ_BATCH, length=length) \
            if hi > lo else np.zeros((0, T))
        return pa.table({"increments": pa.array(values.tolist(), pa.list_(pa.float64()))})

    got_probes = on_ranks(out_url, "probes", N_PROBES, chunk=PROBE_BATCH, rank=rank, world_size=world_size,
                          barrier=barrier, compute=probe_part)
    got_traj = on_ranks(out_url, "trajectories", N_TRAJ, chunk=TRAJ_BATCH, rank=rank, world_size=world_size,
                        barrier=barrier, compute=trajectory_part)
    if rank != 0:
        return None
    return (np.asarray(got_probes.column("influence")),
            np.asarray(got_traj.column("increments").to_pylist(), dtype=np.float64))


def main(out: str) -> None:
    from training import dist_utils

    dist_utils.init("cpu")
    rank, world_size = dist_utils.rank(), dist_utils.world_size()
    result = compute_all(os.path.join(out, "stage"), rank, world_size, dist_utils.barrier)
    if result is not None:
        np.save(os.path.join(out, "probes.npy"), result[0])
        np.save(os.path.join(out, "trajectories.npy"), result[1])

    def failing(lo: int, hi: int) -> pa.Table:
        if rank == world_size - 1:
            raise RuntimeError("injected failure")
        return pa.table({"x": np.arange(lo, hi)})

    try:
        on_ranks(os.path.join(out, "stage"), "failing", 8, chunk=2, rank=rank, world_size=world_size,
                 barrier=dist_utils.barrier, compute=failing)
        message = "no error"
    except MatesError as exc:
        message = str(exc)
    with open(os.path.join(out, f"failure-{rank}.json"), "w") as handle:
        json.dump(message, handle)


if __name__ == "__main__":
    main(sys.argv[1])
