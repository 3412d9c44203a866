"""Detectors that run inside the evaluation's test loop: one kind of thing with one interface.

A detector that needs the images and a model call per batch (DiffGuard, the diffusion detectors) is
a :class:`LoopDetector`: what it must be fitted on before the loop (:attr:`~LoopDetector.fit_on`), the UNet
evaluations it plans per image (:attr:`~LoopDetector.unet_evals_per_image`), and :meth:`~LoopDetector.score`: a
batch in, its record columns out (names from diffguard_pl/records/columns.py), with what it computed for the
detectors after it and the callbacks. The evaluator (diffguard_pl/modules/evaluator.py) runs the run's loop
detectors in order on every batch and turns their columns into records; nothing else.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Protocol, Tuple

import torch

from diffguard_pl.detectors import registry
from diffguard_pl.detectors.diffusion import DiffusionDetector, statistics_of, unet_evals
from diffguard_pl.detectors.tuning import ClassifierDetectors
from diffguard_pl.method import oracle as oracle_lib
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.records import columns as col

Columns = Dict[str, list]


class LoopDetector(Protocol):
    fit_on: Tuple[str, ...]  # what it is fitted on before the loop: () nothing, or splits such as "ind_train"
    modules: Dict[str, torch.nn.Module]  # the models it runs (the evaluator registers them: device moves)

    def unet_evals_per_image(self) -> float:
        """The UNet evaluations it plans per image (the run's cost axis; AES may spend fewer)."""

    def score(self, batch: Mapping, computed: dict) -> Tuple[Columns, dict]:
        """``batch`` (``image``, ``id``, ``label``, ...) -> (its record columns, what it computed: logits, features,
        syntheses, curves, ...). ``computed``: what the detectors before it in the loop computed."""


def _floats(values: torch.Tensor) -> list:
    return values.double().tolist()


class DiffGuardInLoop:
    """DiffGuard (inversion, guided synthesis, distances) on a batch, under the predicted label and, with an
    oracle, under the oracle's labels too."""

    fit_on: Tuple[str, ...] = ()

    def __init__(self, pipeline: DiffGuardPipeline, oracle: str = "none"):
        self.pipeline, self.oracle = pipeline, oracle
        self.modules = {"unet": pipeline.diffusion.unet, "vae": pipeline.diffusion.vae,
                        "classifier": pipeline.classifier, "perceptual": pipeline.perceptual,
                        "encoder": pipeline.encoder}

    def unet_evals_per_image(self) -> float:
        return float(self.pipeline.unet_evals(self.pipeline.cfg.depth))

    def score(self, batch: Mapping, computed: dict) -> Tuple[Columns, dict]:
        oracles = oracle_lib.oracles(self.oracle, batch["label"], batch["id"],
                                     self.pipeline.classifier.spec.num_classes, self.pipeline.cfg.seed)
        out = self.pipeline(batch["image"], batch["id"], oracles)
        # the pipeline names these outputs as their columns; the last two come with the unguided reference
        record = {name: out[name].tolist() for name in (col.PRED, col.SYNTHESIS_PRED, col.DEPTH, col.UNET_EVALS,
                                                        col.REFERENCE_PRED, col.ROUND_TRIP_PSNR) if name in out}
        for name, value in out["scores"].items():
            record[col.distance_column(name)] = _floats(value)
        for name, value in out.get("input_scores", {}).items():
            record[col.distance_column(name, against_input=True)] = _floats(value)
        for mode, scores in out.get("oracle_scores", {}).items():
            for name, value in scores.items():
                record[col.oracle_column(mode, col.distance_column(name))] = _floats(value)
        depth = out["depth"].tolist()
        for name, values in out["curves"].items():  # kept with the records: the plots cover resumed samples too
            record[col.curve_column(name)] = [row[:d] for row, d in zip(_floats(values), depth)]
        return record, out


class ClassifierDetectorsInLoop:
    """The fitted classifier detectors (diffguard_pl/detectors/fitting.py) on a batch: from the logits and
    features a detector before them computed (DiffGuard's classifier pass), else from a classifier pass of
    their own."""

    fit_on: Tuple[str, ...] = ("ind_train", "val")

    def __init__(self, classifier_detectors: ClassifierDetectors, classifier=None):
        self.classifier_detectors, self.classifier = classifier_detectors, classifier
        self.modules: Dict[str, torch.nn.Module] = {}

    def unet_evals_per_image(self) -> float:
        return 0.0

    def to(self, device) -> None:
        self.classifier_detectors = self.classifier_detectors.to(device)

    def score(self, batch: Mapping, computed: dict) -> Tuple[Columns, dict]:
        if "logits" not in computed:
            with torch.no_grad():
                computed = dict(computed)
                computed["logits"], computed["features"] = self.classifier.forward_with_features(batch["image"])
        scores = self.classifier_detectors.score(computed["logits"], computed["features"], batch["image"])
        return {name: value.tolist() for name, value in scores.items()}, {}


class DiffusionDetectorsInLoop:
    """The diffusion detectors (diffguard_pl/detectors/diffusion.py) on a batch: each one's statistics as
    ``stats/<detector>/<kind>`` columns (what its head reads: a head can be refitted from the records) and its
    score, fitted on InD training images before the loop (DiffPath, MSMA) or needing no fit (LMD); DDPM-OOD's
    score comes from its per-level errors, z-scored on the InD validation records by the report
    (diffguard_pl/detectors/fused.py). Detectors whose statistics are the same (DiffPath-6D and -1D) compute
    them once."""

    fit_on: Tuple[str, ...] = ("ind_train",)

    def __init__(self, detectors: List[DiffusionDetector]):
        self.detectors = list(detectors)
        diffusion = self.detectors[0].diffusion
        self.modules = {"detector_unet": diffusion.unet, "detector_vae": diffusion.vae}

    def unet_evals_per_image(self) -> float:
        return float(unet_evals(self.detectors))

    def score(self, batch: Mapping, computed: dict) -> Tuple[Columns, dict]:
        stats = statistics_of(self.detectors, batch["image"], batch["id"])
        record: Columns = {}
        for detector in self.detectors:
            for kind, values in stats[detector.name].items():
                record[col.stats_column(detector.name, kind)] = _floats(values)
            if detector.fit_on != registry.FIT_VAL:
                record[detector.name] = _floats(detector.score(stats[detector.name]))
        return record, {}


def sample_columns(batch: Mapping) -> Columns:
    """The columns the data gives every record: id, set, split, label."""
    return {col.ID: list(batch["id"]), col.SET: list(batch["set"]), col.SPLIT: list(batch["split"]),
            col.LABEL: batch["label"].tolist()}


def score_batch(detectors: List[LoopDetector], batch: Mapping) -> Tuple[Columns, dict]:
    """Every loop detector on one batch, in order: the batch's record columns and everything they computed."""
    record, computed = sample_columns(batch), {}
    for detector in detectors:
        columns, out = detector.score(batch, computed)
        record.update(columns)
        computed.update(out)
    return record, computed
