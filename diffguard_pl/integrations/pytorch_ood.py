"""DiffGuard as a pytorch-ood ``Detector``, so that pytorch-ood's ``OODMetrics`` and ``GridSearch`` take it as they
are (either guidance path, any preset).

    from pytorch_ood.metrics import OODMetrics
    from diffguard_pl.integrations.pytorch_ood import DiffGuardDetector

    detector = DiffGuardDetector.from_preset("digits_gdm", partner="ebo").fit(ind_val_loader)
    metrics = OODMetrics()
    for x, y in test_loader:                 # x in [0, 1]; y < 0 marks OOD samples, as pytorch-ood's
        metrics.update(detector(x), y)       # larger = more OOD
    print(metrics.compute()["AUROC"])

``fit(loader)`` does what evaluate.py does before scoring, on the loader's InD samples (labels >= 0): with
``aes_target`` the adaptive early stop's PSNR threshold is calibrated on them (``python -m
diffguard_pl.jobs.calibration``'s quantile rule: the quantile ``aes_target`` of each sample's lowest PSNR
along a full-depth inversion); with a ``partner`` (a classifier detector: ``diffguard+X``) the partner is fitted on
them unless ``fit_partner=False`` (pass a partner fitted on InD training data to keep the two apart, as evaluate.py
does: it normalises on InD validation data), and the z-score normalisation of both scores is fitted on them.
Without either, DiffGuard learns nothing and ``fit`` is not needed.

Every sample's id, which seeds its cutouts, is a digest of its pixels, so a score does not depend on the batch
beyond rounding (float32 models sum in an order that depends on the batch size; evaluate.py uses the dataset's ids
instead: the same image scores alike, not identically, there).

The diffusion detectors (DDPM-OOD, LMD, DiffPath, MSMA) are pytorch-ood detectors as they are:
:class:`~diffguard_pl.api.DiffusionBaseline`, exported here too, whose ``fit(loader)`` fits the head on the loader's
InD samples, which must be InD training images, or InD validation images for DDPM-OOD (docs/diffusion_detectors.md):

    msma = DiffusionBaseline.from_preset("digits_gdm", "msma").fit(ind_train_loader)
    metrics.update(msma(x), y)

As a fused detector's partner, pass one fitted beforehand with ``fit_partner=False`` (``fit(loader)`` would fit
it on the loader's InD samples, which are validation images): ``DiffGuardDetector.from_preset("digits_gdm",
partner=msma, fit_partner=False)``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Union

import torch
from pytorch_ood.api import Detector, RequiresFittingException

from diffguard_pl.api import Baseline, DiffGuard, DiffusionBaseline, batches, sample_ids
from diffguard_pl.console import Phase
from diffguard_pl.detectors.fused import fuse, zscore
from diffguard_pl.method.pipeline import DiffGuardPipeline, check_images

DEPTH_FRACTIONS = (0.3, 0.5, 0.7)  # of num_steps: depth candidates (the embedded presets were tuned over such)
SCALES = (1.0, 3.0, 10.0, 30.0)  # guidance strength candidates: classifier scale or classifier-free omega

__all__ = ["DiffGuardDetector", "DiffusionBaseline", "sample_ids"]


class DiffGuardDetector(Detector):
    """DiffGuard's score (``distance``, default the preset's ``diffguard.score``), or with a ``partner`` the fused
    ``diffguard+X``: the sum of both z-scores, normalised on the InD samples ``fit`` sees."""

    def __init__(self, diffguard: DiffGuard, distance: Optional[str] = None, partner: Optional[Detector] = None,
                 fit_partner: bool = True, aes_target: Optional[float] = None, batch_size: int = 64,
                 check_classifier: bool = True):
        cfg = diffguard.pipeline.cfg
        if aes_target is not None and not 0.0 < aes_target < 1.0:
            raise ValueError(f"aes_target={aes_target} must lie in (0, 1): the fraction of InD samples that stop "
                             f"inverting before diffguard.depth")
        self.pipeline: DiffGuardPipeline = diffguard.pipeline
        self.distance = distance or cfg.score
        self._check_distance(self.distance)
        self.partner, self.fit_partner, self.aes_target, self.batch_size = partner, fit_partner, aes_target, batch_size
        self.check_classifier = check_classifier
        self.norm: Optional[Dict[str, tuple]] = None
        self.requires_fit = partner is not None or aes_target is not None
        most = cfg.num_steps - (cfg.ladder == "released") - (cfg.handoff == "released")
        depths = {min(most, max(1, round(f * cfg.num_steps))) for f in DEPTH_FRACTIONS} | {cfg.depth}
        self.hyperparameter_space = {"depth": sorted(depths), "scale": sorted(set(SCALES) | {self.scale}),
                                     "distance": list(cfg.distances)}

    @classmethod
    def from_preset(cls, name: str, *overrides: str, partner: Union[str, Detector, None] = None,
                    device: Union[str, torch.device] = "cpu", **kwargs: Any) -> "DiffGuardDetector":
        """A preset by name (conf/), with ``key=value`` overrides; ``partner``: a classifier detector's name
        (docs/detectors.md), built on the preset's classifier, or a pytorch-ood detector."""
        diffguard = DiffGuard.from_preset(name, *overrides, device=device)
        if isinstance(partner, str):
            partner = Baseline(partner, diffguard.classifier)
        return cls(diffguard, partner=partner, **kwargs)

    # ---------------------------------------------------------------- hyperparameters: depth, scale, distance

    @property
    def depth(self) -> int:
        return self.pipeline.cfg.depth

    @property
    def scale(self) -> float:
        """Guidance strength: ``guidance.scale`` (classifier guidance) or ``guidance.classifier_free.omega``."""
        guidance = self.pipeline.cfg.guidance
        return float(guidance.classifier_free.omega if guidance.mode == "classifier_free" else guidance.scale)

    def _check_distance(self, distance: str) -> None:
        if distance not in self.pipeline.cfg.distances:
            raise ValueError(f"distance {distance!r} is not computed: choose one of diffguard.distances "
                             f"{list(self.pipeline.cfg.distances)}")

    def set_hyperparameters(self, **kwargs: Any) -> "DiffGuardDetector":
        """Set ``depth``, ``scale`` and / or ``distance``; the normalisation of a fused detector must be fitted
        again."""
        unknown = sorted(set(kwargs) - set(self.hyperparameter_space))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}: DiffGuard has {list(self.hyperparameter_space)}")
        if "distance" in kwargs:
            self._check_distance(kwargs["distance"])
            self.distance = kwargs["distance"]
        changes = {k: v for k, v in kwargs.items() if k in ("depth", "scale")}
        if changes:
            cfg = copy.deepcopy(self.pipeline.cfg)
            cfg.depth = int(changes.get("depth", cfg.depth))
            if "scale" in changes:
                free = cfg.guidance.mode == "classifier_free"
                setattr(cfg.guidance.classifier_free if free else cfg.guidance, "omega" if free else "scale",
                        float(changes["scale"]))
            cfg.__post_init__()  # the config's own checks (depth within num_steps, ...)
            self._rebuild(cfg)
        self.norm = None
        return self

    def get_hyperparameters(self) -> dict:
        return {"depth": self.depth, "scale": self.scale, "distance": self.distance}

    def _rebuild(self, cfg) -> None:
        p = self.pipeline
        self.pipeline = DiffGuardPipeline(p.diffusion, p.classifier, cfg, encoder=p.encoder)

    def to(self, device: Union[str, torch.device]) -> "DiffGuardDetector":
        self.pipeline.to(device)
        if self.partner is not None:
            self.partner.to(device)
        return self

    # ---------------------------------------------------------------- fit and predict

    def fit(self, data_loader) -> "DiffGuardDetector":
        """AES calibration and the fused detector's partner and normalisation, on the loader's InD samples (their
        labels, where given, first check the classifier: :meth:`_check_classifier`). Each
        step prints its cost (images x UNet evaluations) before it starts, then its progress, on stderr. The
        normalisation is a mean and a standard deviation per score: a few hundred InD validation images do
        (the standard deviation's relative error is about 1 / sqrt(2n): 5% at 200 images; evaluate.py's demo
        uses 200), and every image costs a full DiffGuard run."""
        if not self.requires_fit:
            return self
        images, labels = self._ind_samples(data_loader)
        if labels is not None and self.check_classifier:
            self._check_classifier(images, labels)
        if self.aes_target is not None:
            self._calibrate_aes(images)
        if self.partner is not None:
            if len(images) < 2:
                raise ValueError(f"the fused detector's normalisation needs at least 2 InD samples, got {len(images)}")
            if self.fit_partner and getattr(self.partner, "requires_fit", False):
                parts = images.split(self.batch_size)
                self.partner.fit(list(zip(parts, labels.split(self.batch_size))) if labels is not None else parts)
            evals = int(self.pipeline.unet_evals(self.depth))
            with Phase(f"DiffGuardDetector.fit: DiffGuard on each InD image for the z-score normalisation ({evals} "
                       f"UNet evaluations each, {len(images) * evals:,} in all)", len(images)) as phase:
                own = self._diffguard(images, phase)
            self.norm = {"diffguard": zscore(own), "partner": zscore(self._partner(images))}
        return self

    def _check_classifier(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """evaluate.py's check (diffguard_pl/detectors/classifier_check.py) on the loader's labelled InD samples:
        ValueError when the classifier's accuracy on them is near chance or far below the accuracy recorded at
        its training (with 100 samples or more)."""
        from diffguard_pl.detectors.classifier_check import accuracy, check_classifier_fits

        classifier = self.pipeline.classifier
        device = next(classifier.parameters()).device
        with torch.no_grad():
            logits = torch.cat([classifier(x.to(device)).cpu() for x in images.split(self.batch_size)])
        measured, n = accuracy(logits, labels)
        recorded = (classifier.spec.trained_on or {}).get("validation_accuracy")
        problem = check_classifier_fits(measured, n, classifier.spec.num_classes, recorded)
        if problem is not None:
            raise ValueError(f"the classifier does not fit the loader's InD samples: {problem}. Are the labels the "
                             f"classifier's (same classes, same order)? check_classifier=False fits anyway")

    @staticmethod
    def _ind_samples(data_loader) -> tuple:
        """The loader's InD images (labels >= 0, where it gives labels) and their labels (None without)."""
        given = list(batches(data_loader))
        images = torch.cat([x if y is None else x[y >= 0] for x, y in given])
        labels = None if any(y is None for _, y in given) else torch.cat([y[y >= 0] for _, y in given])
        if not len(images):
            raise ValueError("fit needs InD samples (labels >= 0), and the loader gave none")
        return images, labels

    def _calibrate_aes(self, images: torch.Tensor) -> None:
        from diffguard_pl.method.aes import lowest_quality

        probe = copy.deepcopy(self.pipeline.cfg)
        probe.aes.enabled, probe.aes.record_curves = False, True
        p = self.pipeline
        pipe = DiffGuardPipeline(p.diffusion, p.classifier, probe, encoder=p.encoder)
        lows = []
        with Phase(f"DiffGuardDetector.fit: AES calibration, each InD image inverted to diffguard.depth "
                   f"({probe.depth} UNet evaluations each, {len(images) * probe.depth:,} in all)", len(images)) as phase:
            for x in images.cpu().split(self.batch_size):
                lows.append(lowest_quality(pipe, x, sample_ids(x), "psnr", self.batch_size))
                phase.advance(len(x))
        lows = torch.cat(lows)
        cfg = copy.deepcopy(self.pipeline.cfg)
        cfg.aes.enabled, cfg.aes.psnr = True, float(torch.quantile(lows[torch.isfinite(lows)].double(),
                                                                   self.aes_target))
        cfg.__post_init__()
        self._rebuild(cfg)

    def _diffguard(self, images: torch.Tensor, phase: Optional[Phase] = None) -> torch.Tensor:
        scores = []
        for x in images.split(self.batch_size):
            scores.append(self.pipeline(x, sample_ids(x))["scores"][self.distance].double().cpu())
            if phase is not None:
                phase.advance(len(x))
        return torch.cat(scores)

    def _partner(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.partner.predict(x).double().cpu() for x in images.split(self.batch_size)])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """One score per image (float64, on the CPU), larger = more OOD."""
        check_images(x)
        scores = self._diffguard(x)
        if self.partner is None:
            return scores
        if self.norm is None:
            raise RequiresFittingException("the fused detector is not normalised yet: call fit(loader) with InD "
                                           "samples first")
        return fuse(scores, self._partner(x), self.norm["diffguard"], self.norm["partner"])
