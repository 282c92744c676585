"""Composer callbacks of the stage loop: token counting, throughput and a console line.

Behaviour is added by events, not by forking Composer's loop. Metric keys are namespaced:
`throughput/tokens_per_s`, `train/tokens_seen` (this rank's), `train/loss`, `train/lr` (the lr the
batch trained at: Composer's `lr_monitor` logs the lr after the end-of-batch scheduler step,
i.e. the next batch's).
"""
from __future__ import annotations

import time

from composer.core import Callback, Event, State
from composer.loggers import Logger

from curation.failpoints import failpoint


class StageMonitor(Callback):
    """Counts real (non-padding) tokens and logs loss and tokens/s every `interval` batches.

    Throughput is wall time from FIT_START, so it includes waiting on the dataloader (the
    streaming cost is what a user pays), not just the forward/backward of each batch.
    """

    def __init__(self, *, stage: int, interval: int = 10, log=print, rank: int = 0):
        self.stage, self.interval, self.log, self.rank = stage, interval, log, rank
        self.tokens = 0
        self.batches = 0
        self.seconds = 0.0
        self._fit_start = 0.0
        self._loss_sum = 0.0
        self._lr = float("nan")

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "batches": self.batches, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.batches, self.seconds = state["tokens"], state["batches"], state["seconds"]

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start = time.perf_counter() - self.seconds
        elif event == Event.BATCH_START:
            self._lr = float(state.optimizers[0].param_groups[0]["lr"])
        elif event == Event.BATCH_END:
            self.seconds = time.perf_counter() - self._fit_start
            self.tokens += int(state.batch["attention_mask"].sum())
            self.batches += 1
            loss = float(state.loss.detach()) if hasattr(state.loss, "detach") else float("nan")
            self._loss_sum += loss
            logger.log_metrics({"train/loss": loss, "train/tokens_seen": self.tokens, "train/lr": self._lr,
                                "throughput/tokens_per_s": self.tokens_per_s})
            if self.batches == 2:
                failpoint("train")
            if self.rank == 0 and self.batches % self.interval == 0:
                self.log(f"  stage {self.stage} batch {int(state.timestamp.batch):5d}  "
                         f"loss {self._loss_sum / self.interval:.4f}  "
                         f"{self.tokens_per_s:,.0f} tokens/s (rank 0)")
                self._loss_sum = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0
