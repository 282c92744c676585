"""The oracle on every rank: probes and trajectories dealt to the ranks of a launched run.

Work is dealt in whole chunks (`chunk` probes or trajectories, the batch each rank computes at
once), contiguous chunks per rank, so every chunk is computed with the same rows and the same
padding whatever the world size: N ranks give one rank's values (bit for bit on one machine).
Each rank writes its part as `<stage>/oracle/<kind>-part-<rank>.parquet`; after a barrier rank 0
merges the parts in rank order. A rank that raises writes `<kind>-failed-<rank>.txt` with its
error before the barrier, so the others never wait on it: every rank then raises naming it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas.errors import MatesError
from schemas.storage import join, read_parquet, store_for, write_parquet


def dealt(n: int, chunk: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [lo, hi) rows of `n` that `rank` computes: whole chunks of `chunk`, contiguous per rank."""
    if not 0 <= rank < world_size or chunk < 1:
        raise MatesError(f"`rank` must be in [0, {world_size}) and `chunk` >= 1; got {rank}, {chunk}.")
    n_chunks = -(-n // chunk)
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(n_chunks), world_size)])
    return min(int(bounds[rank]) * chunk, n), min(int(bounds[rank + 1]) * chunk, n)


def _oracle_url(stage_url: str) -> str:
    return join(stage_url, "oracle")


def part_name(kind: str, rank: int) -> str:
    return f"{kind}-part-{rank:05d}.parquet"


def failure_name(kind: str, rank: int) -> str:
    return f"{kind}-failed-{rank:05d}.txt"


def run_part(stage_url: str, kind: str, rank: int, world_size: int, compute, barrier) -> None:
    """`compute()` -> this rank's part (an Arrow table), written; then the barrier, failure or not.

    Raises on every rank when any rank failed, naming the ranks and the first one's error.
    """
    store = store_for(_oracle_url(stage_url))
    error = None
    try:
        write_parquet(compute(), _oracle_url(stage_url), part_name(kind, rank))
    except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here too
        error = exc
        store.write_bytes(f"{type(exc).__name__}: {exc}"[:2000].encode(), failure_name(kind, rank))
    barrier()
    failed = [r for r in range(world_size) if store.exists(failure_name(kind, r))]
    if failed:
        first = store.read_bytes(failure_name(kind, failed[0])).decode(errors="replace")
        raise MatesError(f"the {kind} oracle failed on rank(s) {failed} of {world_size}; rank "
                         f"{failed[0]}: {first}") from error


def merged(stage_url: str, kind: str, world_size: int) -> pa.Table:
    """The parts of ranks 0..world_size-1, concatenated in rank order."""
    url = _oracle_url(stage_url)
    missing = [r for r in range(world_size) if not store_for(url).exists(part_name(kind, r))]
    if missing:
        raise MatesError(f"{url} lacks the {kind} parts of rank(s) {missing}; rerun the stage.")
    return pa.concat_tables([read_parquet(url, part_name(kind, r)) for r in range(world_size)])


def on_ranks(stage_url: str, kind: str, n: int, *, chunk: int, rank: int, world_size: int, barrier,
             compute) -> pa.Table | None:
    """Rows [lo, hi) of `n` dealt to this rank (`dealt`), `compute(lo, hi)` -> their part (a table
    whose rows are those rows, in order); rank 0 gets every rank's part merged, the others None."""
    lo, hi = dealt(n, chunk, rank, world_size)
    run_part(stage_url, kind, rank, world_size, lambda: compute(lo, hi), barrier)
    if rank != 0:
        return None
    table = merged(stage_url, kind, world_size)
    if table.num_rows != n:
        raise MatesError(f"the {kind} parts under {_oracle_url(stage_url)} hold {table.num_rows} rows; "
                         f"the stage deals {n}. Rerun the stage.")
    return table
