"""DiffGuardEvaluator: the Lightning wrapper whose ``test_step`` turns a batch into record rows.

Each ``test_step`` runs the run's loop detectors (diffguard_pl/detectors/loop.py: DiffGuard's inversion and
guided synthesis, then the classifier detectors) on the batch and hands the rows to the record sink
(diffguard_pl/records/store.py), which writes them at once. At the end of the epoch the sink gathers every
process's rows on rank 0; what becomes of them (resume, metrics, outputs) is the record store's and the
report's business, not this module's. ``images`` and ``loop_seconds`` time the test loop (from the first
batch's start to the last batch's end).
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence

import lightning as L
import torch

from diffguard_pl.detectors.loop import DiffGuardInLoop, LoopDetector, score_batch
from diffguard_pl.errors import UserError
from diffguard_pl.records.store import RecordSink


class DiffGuardEvaluator(L.LightningModule):
    def __init__(self, detectors: Sequence[LoopDetector], sink: RecordSink):
        super().__init__()
        self.detectors = list(detectors)
        # Registered so that Lightning moves them to the device; the detectors hold the same objects.
        self.models = torch.nn.ModuleDict({f"{i}_{name}": module for i, d in enumerate(self.detectors)
                                           for name, module in d.modules.items() if module is not None})
        self.sink = sink
        self.gathered: Optional[List[dict]] = None  # every process's rows of this run, on rank 0 after the loop
        self.images, self.loop_seconds = 0, 0.0
        self._loop_started: Optional[float] = None
        self._loop_ended = 0.0

    @property
    def pipeline(self):
        """DiffGuard's pipeline (the callbacks read its config and device)."""
        return next(d.pipeline for d in self.detectors if isinstance(d, DiffGuardInLoop))

    def listen_to_steps(self, listener: Optional[Callable[[int, int], None]]) -> None:
        """``listener(step, steps)`` after every DDIM step of the batch in progress (progress bars); None: stop."""
        self.pipeline.walker.on_step = listener

    def on_test_epoch_start(self) -> None:
        self.gathered, self.images, self.loop_seconds, self._loop_started = None, 0, 0.0, None
        for detector in self.detectors:
            if hasattr(detector, "to"):
                detector.to(self.device)
        self.sink.open(self.global_rank)

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._loop_started is None:
            self._loop_started = time.perf_counter()

    def on_test_batch_end(self, outputs, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._loop_ended = time.perf_counter()

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        try:
            record, computed = score_batch(self.detectors, batch)
        except UserError:
            raise  # an interruption or a user's mistake says itself what to do
        except torch.OutOfMemoryError as error:
            raise RuntimeError(f"out of memory in {self._where(batch, batch_idx)}: lower data.eval_batch_size; "
                               f"samples finished so far are kept in {self.sink.output_dir}/records and running the "
                               f"same command again resumes") from error
        except FloatingPointError as error:  # would recur on a resume: the message says what to change
            raise FloatingPointError(f"{self._where(batch, batch_idx)}: {error}") from error
        except Exception as error:
            raise RuntimeError(f"{self._where(batch, batch_idx)} failed: {type(error).__name__}: {error}") from error
        self.sink.append(record)
        self.images += len(batch["id"])
        return computed  # for callbacks: synthesis, reference, curves, pred, ...

    def on_test_epoch_end(self) -> None:
        self.loop_seconds = self._loop_ended - self._loop_started if self._loop_started is not None else 0.0
        self.gathered = self.sink.gather()
        if self.gathered is not None:
            self.images = len(self.gathered)

    @staticmethod
    def _where(batch: dict, batch_idx: int) -> str:
        return f"test batch {batch_idx} ({len(batch['id'])} samples, first id {batch['id'][0]})"
