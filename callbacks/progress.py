"""Progress of an evaluation that a person can read: images done, images/s, time left, and the DDIM step of
the batch in progress.

On a terminal one line is redrawn (at most a few times a second); elsewhere (a log file, CI) one line is
printed per batch. Under several processes rank 0 reports its own share of the samples. images/s has the
definition of results.json's ``throughput`` (diffguard_pl/jobs/report.py): images per second of the test loop,
timed from the first batch's start.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import lightning as L

from diffguard_pl.console import duration


class EvalProgress(L.Callback):
    def __init__(self, stream: Optional[TextIO] = None, redraw_seconds: float = 0.25):
        self.stream = stream or sys.stderr
        self.redraw_seconds = redraw_seconds
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = self.done = self.batches = self.batch_index = self.in_batch = 0
        self.started = self._last_draw = 0.0

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        self.total = len(loader.sampler) if hasattr(loader, "sampler") else len(loader.dataset)
        self.batches = len(loader)
        self.done, self.started = 0, 0.0
        self.rank_zero = trainer.is_global_zero
        if self.rank_zero:
            ranks = f" (this process's share, of {trainer.world_size} processes)" if trainer.world_size > 1 else ""
            self._write(f"evaluating {self.total:,} images in {self.batches:,} batches{ranks}\n")
        pl_module.listen_to_steps(self._on_step)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.batch_index, self.in_batch = batch_idx + 1, len(batch["id"])
        if not self.started:  # the clock of images/s starts with the first batch, as results.json's
            self.started = time.perf_counter()

    def _status(self, step: str = "") -> str:
        elapsed = time.perf_counter() - self.started if self.started else 0.0
        rate = self.done / elapsed if self.done and elapsed > 0 else 0.0
        eta = f", {duration((self.total - self.done) / rate)} left" if rate > 0 else ""
        speed = f", {rate:.2f} images/s" if rate > 0 else ""
        return f"{self.done:,}/{self.total:,} images, batch {self.batch_index}/{self.batches}{step}{speed}{eta}"

    def _on_step(self, step: int, most: int) -> None:
        if not (self.rank_zero and self.tty):
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.redraw_seconds:
            self._last_draw = now
            self._write("\r\033[K" + self._status(f" (DDIM step {step}/{most})"))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.done += len(batch["id"])
        if not self.rank_zero:
            return
        self._write(("\r\033[K" if self.tty else "") + self._status() + ("" if self.tty else "\n"))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.listen_to_steps(None)
        if self.rank_zero and self.tty:
            self._write("\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
