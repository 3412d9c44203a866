"""The Python API: presets by name and detectors with one interface, without Lightning.

    from diffguard_pl.api import Baseline, DiffGuard, DiffusionBaseline, load_preset

    detector = DiffGuard.from_preset("digits_gdm")     # conf/digits_gdm.yaml, its models loaded
    scores = detector.fit(train_images).score(images)  # images [N, C, H, W] in [0, 1]; higher = more OOD
    knn = Baseline("knn", detector.classifier, k=50).fit(train_images)
    knn.score(images)
    msma = DiffusionBaseline.from_preset("digits_gdm", "msma", levels=10).fit(train_images)
    msma.score(images)

Every detector has ``fit(data)`` (a tensor of InD training images in [0, 1], a DataLoader of such batches
(tensors, (images, labels) pairs or dicts with "image" and "label"), or nothing for detectors that learn nothing)
and ``score(images)`` returning one float64 score per image, higher meaning more OOD (``predict`` is the same, the
name pytorch-ood uses). :class:`Baseline` and :class:`DiffusionBaseline` (the diffusion detectors; DDPM-OOD is fitted
on InD validation images, not training images) are pytorch-ood detectors (``pytorch_ood.api.Detector``): pytorch-ood's
``OODMetrics`` and ``GridSearch`` take them as they are; DiffGuard as one: diffguard_pl/integrations/pytorch_ood.py.
Images are always in [0, 1]; anything else is an error, not a guess.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from pytorch_ood.api import Detector, RequiresFittingException

from diffguard_pl.config import EvalConfig
from diffguard_pl.config_loading import compose, to_object
from diffguard_pl.detectors import registry
from diffguard_pl.console import Phase
from diffguard_pl.detectors.classifier_parts import (
    ClassifierParts, DetectorUnavailable, Samples, detector_class, fit, predict, why_not,
)
from diffguard_pl.detectors.diffusion import DiffusionDetector, Statistics, classifier_features
from diffguard_pl.detectors.tuning import train_rows, check_fixed, resolve_defaults, resolve_grid
from diffguard_pl.errors import ConfigError
from diffguard_pl.method.pipeline import check_images
from diffguard_pl.models import Classifier, DiffusionModel, load_classifier, load_diffusion

CONF = Path(__file__).resolve().parent.parent / "conf"
Data = Union[torch.Tensor, Iterable]


def presets() -> list:
    """The names of the evaluation presets in conf/."""
    return sorted(p.stem for p in CONF.glob("*.yaml") if not p.stem.startswith("train_"))


def load_preset(name: str, *overrides: str) -> EvalConfig:
    """An evaluation preset by name (or a YAML path), with ``key=value`` overrides; model paths in the preset
    are resolved against the project, so this works from any working directory."""
    path = Path(name)
    if not path.suffix:
        path = CONF / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"no preset {name!r}: choose one of {presets()} or pass a YAML path")
    return to_object(compose(EvalConfig, [path], list(overrides)))


def sample_ids(images: torch.Tensor) -> List[str]:
    """A stable id per image: the first 16 hex digits of the SHA-1 of its float32 pixels (what seeds a sample's
    noise when no dataset id is given, so that its score does not depend on its batch or position)."""
    pixels = images.detach().to("cpu", torch.float32).contiguous()
    return [hashlib.sha1(p.numpy().tobytes()).hexdigest()[:16] for p in pixels]


def batches(data: Data, batch_size: int = 256) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(images, labels or None) batches from a tensor or an iterable of batches (tensors, (images, labels) pairs
    or dicts with "image" and optionally "label"), the images checked to be in [0, 1]."""
    if torch.is_tensor(data):
        check_images(data)
        yield from ((data[i: i + batch_size], None) for i in range(0, len(data), batch_size))
        return
    for batch in data:
        if isinstance(batch, dict):
            images, labels = batch["image"], batch.get("label")
        elif isinstance(batch, (list, tuple)):
            images, labels = batch[0], batch[1] if len(batch) > 1 else None
        else:
            images, labels = batch, None
        yield check_images(images), None if labels is None else torch.as_tensor(labels)


class DiffGuard:
    """DiffGuard as a detector: the distance between an image and its synthesis under the predicted label."""

    def __init__(self, pipeline, score: Optional[str] = None):
        self.pipeline = pipeline
        self.distance = score or pipeline.cfg.score

    @classmethod
    def from_preset(cls, name: str, *overrides: str, device: Union[str, torch.device] = "cpu") -> "DiffGuard":
        from diffguard_pl.models.loading import load_encoder
        from diffguard_pl.method.pipeline import DiffGuardPipeline

        cfg = load_preset(name, *overrides)
        m = cfg.models
        pipeline = DiffGuardPipeline(load_diffusion(m.diffusion, m.diffusion_num_classes, m.diffusion_null_class),
                                     load_classifier(m.classifier), cfg.diffguard, encoder=load_encoder(cfg))
        return cls(pipeline.to(device))

    @property
    def classifier(self) -> Classifier:
        return self.pipeline.classifier

    def fit(self, data: Optional[Data] = None) -> "DiffGuard":
        """Nothing to learn (the models are trained): returns the detector, so ``fit(...).score(...)`` reads."""
        return self

    def __call__(self, images: torch.Tensor, ids: Optional[Sequence[str]] = None) -> dict:
        """Every output of the pipeline (scores per distance, predictions, syntheses, ...)."""
        return self.pipeline(images, ids)

    def score(self, images: torch.Tensor, ids: Optional[Sequence[str]] = None) -> torch.Tensor:
        """One score per image (the configured distance, float64), higher = more OOD."""
        return self(images, ids)["scores"][self.distance].double().cpu()

    predict = score


class Baseline(Detector):
    """A classifier detector by name (docs/detectors.md: ``msp``, ``ebo``, ``knn``, ``vim``, ``ash``, ``odin``, ...)
    on a classifier, with its hyperparameters as keywords (``Baseline("knn", classifier, k=50)``); those not given
    take the registry's defaults. Raises :class:`DetectorUnavailable` (one line: why) for a detector that cannot run
    on the classifier."""

    def __init__(self, name: str, classifier: Classifier, **hyperparameters: Any):
        self.entry = registry.classifier_detector(name)
        known = registry.hyperparameters(name)
        unknown = sorted(set(hyperparameters) - set(known))
        if unknown:
            raise ValueError(f"{name} has no hyperparameter {', '.join(unknown)}: "
                             f"{'it has ' + ', '.join(known) if known else 'it has none'}")
        self.name, self.classifier, self.parts = name, classifier.eval(), ClassifierParts(classifier)
        reason = why_not(self.entry, self.parts)
        if reason is not None:
            raise DetectorUnavailable(f"{name} cannot run on this classifier: {reason}")
        self.params = dict(hyperparameters)
        self.sizes = registry.Sizes(sys.maxsize, self.parts.feature_width, classifier.spec.num_classes)
        self.hyperparameter_space = resolve_grid(self.entry, self.sizes)[0]
        self.detector = None
        self.requires_fit = bool(getattr(detector_class(self.entry), "requires_fit", False))

    def _build(self, sizes: registry.Sizes):
        params = {**resolve_defaults(self.entry, sizes), **self.params}
        check_fixed(self.entry, sizes, self.params)
        return self.parts.build(self.entry, params)

    def get_hyperparameters(self) -> dict:
        return {**resolve_defaults(self.entry, self.sizes), **self.params}

    def to(self, device: Union[str, torch.device]) -> "Baseline":
        self.classifier.to(device)
        if self.detector is not None:
            self.detector.to(device)
        return self

    def set_hyperparameters(self, **kwargs: Any) -> "Baseline":
        """Set hyperparameters by name; a detector that learns from data must be fitted again."""
        unknown = sorted(set(kwargs) - set(registry.hyperparameters(self.name)))
        if unknown:
            raise ValueError(f"{self.name} has no hyperparameter {', '.join(unknown)}")
        self.params.update(kwargs)
        self.detector = None
        return self

    @torch.no_grad()
    def _samples(self, data: Data, keep_images: bool) -> Samples:
        device = self.parts.device
        logits, feats, labels, images = [], [], [], []
        for x, y in batches(data):
            lo, fe = self.classifier.forward_with_features(x.to(device))
            logits.append(lo.float())
            feats.append(fe.float())
            labels.append(y)
            images.append(x if keep_images else None)
        if not logits:
            raise ValueError("no images given")
        known = None if any(y is None for y in labels) else torch.cat(labels)
        return Samples(torch.cat(logits), torch.cat(feats), known, torch.cat(images) if keep_images else None)

    def fit(self, data: Optional[Data] = None) -> "Baseline":
        """Fit on InD training images (``data``: see the module docstring); the detectors that learn nothing take
        no data. Labels, where given, only mark InD samples, except for the detectors that need them (mds, ...)."""
        if not self.requires_fit:
            self.detector = self._build(self.sizes)
            return self
        if data is None:
            raise ValueError(f"{self.name} is fitted on InD training images: pass them to fit()")
        train = self._samples(data, keep_images=self.entry.reads in (registry.FEATURE_MAPS, registry.IMAGES))
        reason = why_not(self.entry, self.parts, labelled=train.labels is not None)
        if reason is not None:
            raise DetectorUnavailable(f"{self.name} cannot be fitted on these data: {reason}")
        train = train_rows(self.entry, train)
        sizes = self.sizes._replace(train=len(train))
        try:
            self.detector = fit(self._build(sizes), self.entry, self.parts, train)
        except DetectorUnavailable as error:
            raise DetectorUnavailable(f"{self.name} cannot be fitted on these data: {error}") from None
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """One score per image (float64, on the CPU), higher = more OOD."""
        if self.detector is None:
            if self.requires_fit:
                raise RequiresFittingException(f"{self.name} is not fitted yet: call fit(train_images) first")
            self.detector = self._build(self.sizes)
        reason = why_not(self.entry, self.parts)
        if reason is not None:
            raise DetectorUnavailable(f"{self.name} cannot score here: {reason}")
        samples = self._samples(check_images(x), keep_images=self.entry.reads in (registry.FEATURE_MAPS,
                                                                                   registry.IMAGES))
        return predict(self.detector, self.entry, self.parts, samples)

    score = predict


class DiffusionBaseline(Detector):
    """A diffusion detector by name (docs/diffusion_detectors.md: DDPM-OOD, LMD, DiffPath-6D / -1D, MSMA) on an
    unconditional diffusion model, its params as keywords (``DiffusionBaseline("msma", diffusion, levels=10)``);
    those not given take the registry's defaults. ``classifier``: whose penultimate features DDPM-OOD with
    ``features="classifier"`` and LMD with ``distance="features"`` read. ``seed``: added to each sample's id in the
    generators of its noise.

    Every sample's noise is seeded by its id: ``ids`` where given (one per image, as evaluate.py's dataset ids), else
    :func:`sample_ids`, a digest of its pixels; a score does not depend on the batch or the order beyond float32
    rounding. ``fit`` fits the head on the images the registry names (:attr:`fit_on`): DiffPath and MSMA on InD
    training images, DDPM-OOD on InD validation images, LMD on none.
    """

    def __init__(self, name: str, diffusion: DiffusionModel, classifier: Optional[Classifier] = None, seed: int = 0,
                 batch_size: int = 64, **params: Any):
        self.entry = registry.diffusion_detector(name)
        self.name, self.diffusion, self.seed, self.batch_size = name, diffusion, seed, batch_size
        self.classifier = None if classifier is None else classifier.eval()
        self.detector = self._build(params)
        self.hyperparameter_space = {key: list(values) for key, values in self.entry.grid.items()}
        self.requires_fit = self.detector.needs_fit
        self.fitted_on: Optional[int] = None  # how many images the head was fitted on

    @classmethod
    def from_preset(cls, preset: str, name: str, *overrides: str, device: Union[str, torch.device] = "cpu",
                    **params: Any) -> "DiffusionBaseline":
        """Detector ``name`` with a preset's models (conf/, ``key=value`` overrides): the diffusion model
        ``diffusion_detectors.model`` names, else ``models.diffusion`` (run with its null class where it is
        class-conditional), and the preset's classifier; its params: the preset's
        ``diffusion_detectors.params.<name>``, updated by ``params``."""
        from diffguard_pl.models.loading import load_detector_diffusion, load_models

        registry.diffusion_detector(name)  # an unknown name fails before any model loads
        cfg = load_preset(preset, *overrides)
        classifier, diffusion = load_models(cfg)
        detectors = cfg.diffusion_detectors
        if name not in detectors.names:
            detectors.names.append(name)  # this cfg is ours: it only tells load_detector_diffusion what runs
        diffusion = load_detector_diffusion(cfg, diffusion)
        given = {**detectors.params.get(name, {}), **params}
        return cls(name, diffusion.to(device), classifier.to(device), seed=cfg.diffguard.seed, **given)

    def _build(self, params: dict) -> DiffusionDetector:
        features = None if self.classifier is None else classifier_features(self.classifier)
        return DiffusionDetector(self.name, params, self.diffusion, features=features, seed=self.seed)

    @property
    def fit_on(self) -> str:
        """What the head is fitted on: registry.FIT_TRAIN, FIT_VAL (DDPM-OOD) or FIT_NONE (LMD)."""
        return self.detector.fit_on

    def unet_evals_per_image(self) -> int:
        return self.detector.unet_evals_per_image()

    def get_hyperparameters(self) -> dict:
        return dict(self.detector.params)

    def set_hyperparameters(self, **kwargs: Any) -> "DiffusionBaseline":
        """Set params by name (ValueError naming an unknown one); a detector with a head must be fitted again."""
        self.detector = self._build({**self.detector.params, **kwargs})
        self.fitted_on = None
        return self

    def to(self, device: Union[str, torch.device]) -> "DiffusionBaseline":
        self.diffusion.to(device)
        if self.classifier is not None:
            self.classifier.to(device)
        return self

    def _statistics(self, data: Data, ids: Optional[Sequence[str]], phase: Optional[Phase] = None) -> Statistics:
        """The statistics of every image of ``data`` (those labelled < 0, pytorch-ood's OOD mark, left out)."""
        device = next(self.diffusion.unet.parameters()).device
        given = None if ids is None else list(ids)
        if given is not None and _count(data) not in (None, len(given)):
            _wrong_ids(len(given), _count(data))
        parts, seen = {}, 0
        for x, y in batches(data, self.batch_size):
            batch_ids = sample_ids(x) if given is None else given[seen: seen + len(x)]
            seen += len(x)
            if len(batch_ids) != len(x):
                _wrong_ids(len(given), f"more than {len(given)}")
            if phase is not None:
                phase.advance(len(x))
            if y is not None:
                keep = y >= 0
                x, batch_ids = x[keep], [i for i, k in zip(batch_ids, keep.tolist()) if k]
            if len(x):
                for kind, value in self.detector.statistics(x.to(device), batch_ids).items():
                    parts.setdefault(kind, []).append(value)
        if given is not None and seen != len(given):
            _wrong_ids(len(given), seen)
        if not parts:
            raise ValueError("no images given" if not seen else "no InD images given: every label is < 0, "
                             "pytorch-ood's mark of OOD samples")
        return {kind: torch.cat(values) for kind, values in parts.items()}

    def _what_to_fit_on(self) -> str:
        if self.fit_on == registry.FIT_VAL:
            return f"{self.fit_on} (its per-level z-scores; not the training images, which the model was trained on)"
        return self.fit_on

    def fit(self, data: Optional[Data] = None, ids: Optional[Sequence[str]] = None) -> "DiffusionBaseline":
        """Fit the head on InD images (``data``: see the module docstring; labels, where given, mark InD samples:
        those < 0 are left out): :attr:`fit_on`, InD training images for DiffPath and MSMA, InD validation images
        for DDPM-OOD. LMD learns nothing and takes no data. Prints the cost (images x UNet evaluations) and the
        progress on stderr."""
        if not self.requires_fit:
            return self
        if data is None:
            raise ValueError(f"{self.name} is fitted on {self._what_to_fit_on()}: pass them to fit()")
        count, evals = _count(data), self.unet_evals_per_image()
        total = f", {count * evals:,} in all" if count else ""
        with Phase(f"{self.name}: statistics of {self.fit_on} ({evals} UNet evaluations each{total})", count) as phase:
            statistics = self._statistics(data, ids, phase)
        self.detector.fit(statistics)
        self.fitted_on = len(next(iter(statistics.values())))
        return self

    def describe_fit(self) -> dict:
        """What the head was fitted on and chose (mixture components, ...), as results.json says it."""
        fitted = {} if self.fitted_on is None else {"fitted_on": f"{self.fitted_on:,} {self.fit_on}"}
        return {"params": self.get_hyperparameters(), "unet_evals_per_image": self.unet_evals_per_image(), **fitted,
                **self.detector.describe_fit()}

    def score(self, images: torch.Tensor, ids: Optional[Sequence[str]] = None) -> torch.Tensor:
        """One score per image (float64, on the CPU), higher = more OOD; ``ids`` as in :meth:`fit`."""
        if self.requires_fit and self.fitted_on is None:
            raise RequiresFittingException(f"{self.name} is not fitted yet: call fit() with "
                                           f"{self._what_to_fit_on()} first")
        return self.detector.score(self._statistics(check_images(images), ids))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """pytorch-ood's name of :meth:`score`."""
        return self.score(x)


def _count(data: Data) -> Optional[int]:
    """How many images ``data`` holds, where it says so without being read (a tensor, a DataLoader's dataset)."""
    if torch.is_tensor(data):
        return len(data)
    try:
        return len(data.dataset)
    except (AttributeError, TypeError):
        return None


def _wrong_ids(ids: int, images) -> None:
    raise ValueError(f"{ids} ids for {images} images: pass one id per image, or none (the ids are then digests of "
                     f"the pixels)")
