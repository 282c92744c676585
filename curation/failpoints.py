"""Failpoints: named places where a test can kill the process (SIGKILL) to prove resumability.

`MATES_FAILPOINT=name` in the environment kills the process the first time it reaches
`failpoint(name)`. Unset (always, outside tests), a failpoint costs one dictionary lookup.
Names: `train` (during stage training), `probe`, `fit`, `score` (after each MATES phase),
`index` (after the first bucket of a stage index is uploaded), `commit` (index written, before
`_SUCCESS`): the phases tests/test_kills.py kills a `mates` boundary at, in order.
`embed` (after each part an embedding pass writes, curation/influence/embeddings.py) is not in `NAMES`: only
passes that compute new embeddings reach it.

Write faults. `MATES_WRITE_FAULT=ENOSPC:<suffix>` (or `EIO:<suffix>`, any errno name) makes every
store write of a path ending in `<suffix>` fail as a full disk would (`write_fault`, called by
schemas/storage.py's writes; ingest also calls it for its local scratch, suffix `scratch`).
Unlike `MATES_FAILPOINT` it raises, so in-process tests can use it: the failure must be one line
that commits nothing, and the rerun must give the bytes of an uninterrupted run.
"""
from __future__ import annotations

import os
import signal

from schemas.storage import write_fault  # noqa: F401  (the write-fault failpoint, re-exported)

NAMES = ("train", "probe", "fit", "score", "index", "commit")


def failpoint(name: str) -> None:
    if os.environ.get("MATES_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
