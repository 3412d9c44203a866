"""DiffGuardEvaluator: the Lightning wrapper whose ``test_step`` runs DiffGuard on a batch.

Each ``test_step`` runs the batched pipeline (inversion and guided synthesis)
plus the classifier detectors (diffguard_pl/detectors/tuning.py), keeps per-sample records and appends them to the
run's record files. At the end of the epoch the records of every process are
gathered and merged with those an earlier run finished (``previous``), one per
sample id, into ``all_records`` on rank 0 (with the derived detectors: ``diffguard``
and the fused ones), which the callbacks draw and the evaluation job turns into
results. ``images`` and ``loop_seconds`` time the test
loop (from the first batch's start to the last batch's end).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import lightning as L
import torch
import torch.distributed as dist

from diffguard_pl.method import oracle as oracle_lib
from diffguard_pl.detectors.fused import add_derived_detectors
from diffguard_pl.detectors.registry import distance_column, oracle_column
from diffguard_pl.detectors.tuning import ClassifierDetectors
from diffguard_pl.errors import UserError
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.jobs.records import RecordWriter
from diffguard_pl.detectors.results import merge_records


class DiffGuardEvaluator(L.LightningModule):
    def __init__(
        self,
        pipeline: DiffGuardPipeline,
        baselines: ClassifierDetectors,
        groups: Optional[Dict[str, str]] = None,
        oracle: str = "none",
        split: str = "test",
        previous: Optional[Dict[str, list]] = None,
        record_header: Optional[dict] = None,
        output_dir: Optional[str] = None,
    ):
        super().__init__()
        self.pipeline = pipeline
        # Registered so that Lightning moves them to the device; the pipeline holds the same objects.
        self.unet = pipeline.diffusion.unet
        self.vae = pipeline.diffusion.vae
        self.classifier = pipeline.classifier
        self.perceptual = pipeline.perceptual
        self.encoder = pipeline.encoder
        self.baselines = baselines
        self.groups = dict(groups or {})  # OOD set -> near | far, for the callbacks' plots
        self.oracle = oracle
        self.split = split
        self.previous = previous or {}  # records finished by an earlier, interrupted run
        self.record_header, self.output_dir = record_header, output_dir
        self.writer: Optional[RecordWriter] = None
        self.records: List[Dict[str, list]] = []
        self.all_records: Optional[Dict[str, list]] = None
        self.images, self.loop_seconds = 0, 0.0
        self._loop_started: Optional[float] = None
        self._loop_ended = 0.0

    def listen_to_steps(self, listener: Optional[Callable[[int, int], None]]) -> None:
        """``listener(step, steps)`` after every DDIM step of the batch in progress (progress bars); None: stop."""
        self.pipeline.walker.on_step = listener

    def on_test_epoch_start(self) -> None:
        self.records, self.all_records = [], None
        self.images, self.loop_seconds, self._loop_started = 0, 0.0, None
        self.baselines = self.baselines.to(self.device)
        if self.record_header is not None:
            self.writer = RecordWriter(self.output_dir, self.global_rank, self.record_header)

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._loop_started is None:
            self._loop_started = time.perf_counter()

    def on_test_batch_end(self, outputs, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._loop_ended = time.perf_counter()

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        oracles = oracle_lib.oracles(self.oracle, batch["label"], batch["id"],
                                     self.pipeline.classifier.spec.num_classes, self.pipeline.cfg.seed)
        try:
            out = self.pipeline(batch["image"], batch["id"], oracles)
        except UserError:
            raise  # an interruption or a user's mistake says itself what to do
        except torch.OutOfMemoryError as error:
            kept = (f"; samples finished so far are kept in {self.output_dir}/records and running the same command "
                    f"again resumes" if self.writer is not None else "")
            raise RuntimeError(f"out of memory in {self._where(batch, batch_idx)}: lower data.eval_batch_size"
                               f"{kept}") from error
        except FloatingPointError as error:  # would recur on a resume: the message says what to change
            raise FloatingPointError(f"{self._where(batch, batch_idx)}: {error}") from error
        except Exception as error:
            raise RuntimeError(f"{self._where(batch, batch_idx)} failed: {type(error).__name__}: {error}") from error
        record = {
            "id": list(batch["id"]),
            "set": list(batch["set"]),
            "split": list(batch["split"]),
            "label": batch["label"].tolist(),
            "pred": out["pred"].tolist(),
            "synthesis_pred": out["synthesis_pred"].tolist(),  # the classifier on the guided synthesis
            "depth": out["depth"].tolist(),
            "unet_evals": out["unet_evals"].tolist(),
        }
        for name in ("reference_pred", "round_trip_psnr"):  # with the unguided reference
            if name in out:
                record[name] = out[name].tolist()
        for name, value in out["scores"].items():
            record[distance_column(name)] = value.double().tolist()
        for name, value in out.get("input_scores", {}).items():
            record[distance_column(name, against_input=True)] = value.double().tolist()
        for mode, scores in out.get("oracle_scores", {}).items():
            for name, value in scores.items():
                record[oracle_column(mode, distance_column(name))] = value.double().tolist()
        for name, value in self.baselines.score(out["logits"], out["features"], batch["image"]).items():
            record[name] = value.tolist()
        depth = out["depth"].tolist()
        for name, values in out["curves"].items():  # kept with the records: the plots cover resumed samples too
            record[f"curve/{name}"] = [row[:d] for row, d in zip(values.double().tolist(), depth)]
        self.records.append(record)
        if self.writer is not None:
            self.writer.append(record)
        return out  # for callbacks: synthesis, reference, curves, pred, ...

    def on_test_epoch_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.loop_seconds = self._loop_ended - self._loop_started if self._loop_started is not None else 0.0
        parts = self.records
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Optional[List[dict]]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
        self.images = sum(len(p["id"]) for p in parts)
        if self.trainer.is_global_zero:
            self.all_records = merge_records([self.previous] + parts)
            header = self.record_header or {}
            if "score" in header:  # the callbacks draw every detector: the derived ones too
                add_derived_detectors(self.all_records, header["score"], header["partners"])

    @staticmethod
    def _where(batch: dict, batch_idx: int) -> str:
        return f"test batch {batch_idx} ({len(batch['id'])} samples, first id {batch['id'][0]})"
