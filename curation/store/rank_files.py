"""How the ranks of a launched run wait on each other inside a boundary: files in the stage folder.

A boundary may outlast the process group's timeout, so no collective spans a phase: a rank waits
for the file another rank writes when its share is done (`wait_for`). A rank that raises writes
`<stage>/ranks/failed-<rank>.txt` with its error first (`telling_failure`), and every wait also
polls for those files, so no rank waits on one that is gone: each raises naming it (the launcher
would end the others eventually; this makes it one clear line, and in-process ranks need it).
"""
from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np

from schemas.errors import MatesError
from schemas.storage import join, store_for

FOLDER = "ranks"


class PeerFailed(MatesError):
    """Another rank failed; this rank stops too (and writes no failure file of its own)."""


def failure_name(rank: int) -> str:
    return f"failed-{rank:05d}.txt"


@contextmanager
def telling_failure(stage_url: str, rank: int):
    """Run the block; on an error write this rank's failure file for the others, then re-raise."""
    try:
        yield
    except PeerFailed:
        raise
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"[:2000].encode()
        try:
            store_for(join(stage_url, FOLDER)).write_bytes(message, failure_name(rank))
        except Exception:  # noqa: BLE001 - a store that cannot take it: the original error matters more
            pass
        raise


def check_peers(stage_url: str) -> None:
    """Raise `PeerFailed` naming the ranks that wrote a failure file (one listing of the folder)."""
    store = store_for(join(stage_url, FOLDER))
    failed = sorted(int(n[7:12]) for n in store.listdir() if n.startswith("failed-") and n.endswith(".txt"))
    if failed:
        first = store.read_bytes(failure_name(failed[0])).decode(errors="replace")
        raise PeerFailed(f"stage {stage_url}: rank(s) {failed} failed; rank {failed[0]}: {first}")


def wait_for(stage_url: str, *parts: str, poll_s: float = 0.1, max_poll_s: float = 5.0) -> float:
    """Poll until `<stage_url>/<parts>` exists (backing off to `max_poll_s`); the seconds waited.
    Raises `PeerFailed` as soon as any rank has written its failure file."""
    return store_for(stage_url).wait_for(*parts, poll_s=poll_s, max_poll_s=max_poll_s,
                                         check=lambda: check_peers(stage_url))


def write_array(stage_url: str, name: str, array: np.ndarray) -> None:
    """An array one rank hands rank 0 (exact: its dtype and bits), as <stage>/ranks/<name>.npy."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    store_for(join(stage_url, FOLDER)).write_bytes(buffer.getvalue(), f"{name}.npy")


def read_array(stage_url: str, name: str) -> np.ndarray:
    return np.load(io.BytesIO(store_for(join(stage_url, FOLDER)).read_bytes(f"{name}.npy")), allow_pickle=False)


def write_arrays(stage_url: str, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Named arrays one rank hands another at once (exact, as `write_array`), as <stage>/ranks/<name>.npz:
    one object, so the reader that waits for it sees all of them."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    store_for(join(stage_url, FOLDER)).write_bytes(buffer.getvalue(), f"{name}.npz")


def read_arrays(stage_url: str, name: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store_for(join(stage_url, FOLDER)).read_bytes(f"{name}.npz")), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
