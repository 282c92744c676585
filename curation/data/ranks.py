"""The ranks of a data-parallel job as plain callables, so curation/ needs no training/ import.

`jobs/` builds one from Composer's `dist` under the launcher (`composer -n N`); the default is a
single process. `collect` is the one collective the ingest uses: every rank runs its part, the
results are exchanged, and an error on any rank becomes the same one-line `MatesError` on every
rank (instead of the other ranks waiting on a barrier until the process-group timeout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from schemas.errors import MatesError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[Any], list] = staticmethod(lambda obj: [obj])
    barrier: Callable[[], None] = staticmethod(lambda: None)

    def collect(self, fn: Callable[[], Any]) -> list:
        """Run `fn` here, exchange the results: [rank 0's, rank 1's, ...]; errors are shared."""
        error, value, raised = None, None, None
        try:
            value = fn()
        except MatesError as exc:
            error, raised = str(exc), exc
        except Exception as exc:  # a bug: still release the other ranks, then re-raise it here
            error, raised = f"rank {self.rank} failed: {type(exc).__name__}: {exc}", exc
        results = self.all_gather((error, value)) if self.world_size > 1 else [(error, value)]
        if raised is not None:
            raise raised
        for other_error, _ in results:
            if other_error is not None:
                raise MatesError(other_error)
        return [v for _, v in results]
