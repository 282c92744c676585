"""Failpoints: named places where a test can kill the process (SIGKILL) to prove resumability.

`MATES_FAILPOINT=name` in the environment kills the process the first time it reaches
`failpoint(name)`. Unset (always, outside tests), a failpoint costs one dictionary lookup.
Names: `train` (during stage training), `probe`, `fit`, `score` (after each MATES phase),
`index` (after the first bucket of a stage index is uploaded), `commit` (index written, before
`_SUCCESS`): the phases tests/test_kills.py kills a `mates` boundary at, in order.
`embed` (after each part an embedding pass writes, curation/influence/embeddings.py) is not in `NAMES`: only
passes that compute new embeddings reach it.

Delays. `MATES_DELAY=<name>:<seconds>` makes the process sleep that long the first time it reaches
`delay(name)`: a rank made slow, not killed. Names: `curate` (rank 0, inside a boundary's job,
before selection): the test that a boundary longer than the process group's `dist_timeout_s`
does not end a multi-rank run (tests/test_long_boundary.py).

Write faults. `MATES_WRITE_FAULT=ENOSPC:<suffix>` (or `EIO:<suffix>`, any errno name) makes every
store write of a path ending in `<suffix>` fail as a full disk would (`write_fault`, called by
schemas/storage.py's writes; ingest also calls it for its local scratch, suffix `scratch`).
Unlike `MATES_FAILPOINT` it raises, so in-process tests can use it: the failure must be one line
that commits nothing, and the rerun must give the bytes of an uninterrupted run.
"""
from __future__ import annotations

import os
import signal
import time

from schemas.storage import write_fault  # noqa: F401  (the write-fault failpoint, re-exported)

NAMES = ("train", "probe", "fit", "score", "index", "commit")


def failpoint(name: str) -> None:
    if os.environ.get("MATES_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


_delayed: set[str] = set()


def delay(name: str) -> None:
    spec = os.environ.get("MATES_DELAY")
    if not spec or name in _delayed:
        return
    point, _, seconds = spec.partition(":")
    if point == name:
        _delayed.add(name)
        time.sleep(float(seconds))
