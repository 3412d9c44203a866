"""The pieces of a classifier that the classifier detectors are built from, what each detector needs of them, and
how a detector reads a set of samples.

A detector (an entry of diffguard_pl/detectors/registry.py) is a pytorch-ood ``Detector`` built by keyword from
:class:`ClassifierParts`: the head, its weights, the penultimate features as 1x1 maps, the feature maps, the whole
classifier (images in [0, 1] to logits, for the detectors that take gradients). :func:`why_not` says in one line
why a detector cannot run on a classifier; :class:`Samples` holds what the detectors read of a set of samples
(logits and features computed once, images for the few that need them), and :func:`fit` / :func:`predict` call the
detector's own entry point for what it reads.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn
from pytorch_ood.api import FeatureMapsDetector
from torch.utils.data import DataLoader, Dataset

from diffguard_pl.detectors import registry as reg
from diffguard_pl.models import Classifier

Images = Union[torch.Tensor, Dataset, None]  # a tensor [N, C, H, W] in [0, 1], or a set of {"image", ...} samples


class DetectorUnavailable(ValueError):
    """A detector cannot run on this classifier or these data; the message says why, in one line."""


class ClassifierParts:
    """A classifier taken apart for pytorch-ood's detectors (images in [0, 1] everywhere)."""

    none = None

    def __init__(self, classifier: Classifier):
        # a float32 copy of its own (images -> logits: ODIN, GradNorm, NAC, MCD): the detectors are fitted on float32
        # features, and Lightning converts the evaluator's classifier in place (trainer.precision=64-true, bf16-true)
        self.classifier = copy.deepcopy(classifier).float().eval()
        self.model = self.classifier.model
        self.head = self.model.get_classifier()

    def to(self, device) -> "ClassifierParts":
        self.classifier.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def probe(self) -> torch.Tensor:
        """One black image of the classifier's input shape."""
        spec = self.classifier.spec
        return torch.zeros(1, spec.in_chans, spec.input_size, spec.input_size, device=self.device)

    @property
    def feature_width(self) -> int:
        with torch.no_grad():
            return self.features(self.probe()).shape[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight.detach()

    @property
    def bias(self) -> torch.Tensor:
        bias = self.head.bias
        return bias.detach() if bias is not None else self.head.weight.new_zeros(len(self.head.weight))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [B, D]."""
        return self.classifier.forward_with_features(images)[1]

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature maps (timm's ``forward_features``)."""
        return self.model.forward_features(self.classifier.prepare(images))

    def head_on_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(maps)

    @staticmethod
    def pooled_maps(features: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, D] as 1x1 maps [B, D, 1, 1] (the activation-shaping detectors' input)."""
        return features[:, :, None, None]

    def head_on_pooled(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(maps.flatten(1))

    @property
    def stages(self) -> list:
        """The modules timm's ``feature_info`` names (a ResNet's stages)."""
        info = getattr(self.model, "feature_info", None) or []
        names = [i.get("module") for i in (info if isinstance(info, list) else info.get_dicts())]
        return [self.model.get_submodule(n) for n in names if n]

    def head_weight_only(self, name: str) -> bool:
        """GradNorm's parameter filter: the head's weight matrix only (the paper's choice, OpenOOD's)."""
        return name == self._head_weight_name

    @property
    def _head_weight_name(self) -> Optional[str]:
        return next((n for n, p in self.classifier.named_parameters() if p is self.head.weight), None)

    def build(self, entry: reg.Detector, hyperparameters: Mapping[str, Any]):
        """The detector ``entry`` on this classifier with ``hyperparameters`` (a pytorch-ood ``Detector``)."""
        cls = detector_class(entry)
        wired = {key: None if attr is None else getattr(self, attr) for key, attr in entry.wiring.items()}
        return cls(**wired, **entry.fixed, **hyperparameters)


def detector_class(entry: reg.Detector) -> type:
    """The class that implements a detector (imported now)."""
    module, _, name = entry.implementation.rpartition(".")
    return getattr(importlib.import_module(module), name)


def why_not(entry: reg.Detector, parts: ClassifierParts, labelled: bool = True) -> Optional[str]:
    """Why ``entry`` cannot run on this classifier (``labelled``: whether the training samples have labels), in one
    line; None when it can."""
    arch = getattr(getattr(getattr(parts, "classifier", None), "spec", None), "arch", "the classifier")
    if entry.unavailable:
        return entry.unavailable
    if reg.LINEAR_HEAD in entry.needs and not isinstance(parts.head, nn.Linear):
        return f"needs a linear head (W f + b); {arch}'s get_classifier() is a {type(parts.head).__name__}"
    if reg.LABELS in entry.needs and not labelled:
        return "needs the class labels of its InD training images: give (images, labels) batches"
    if reg.GRADIENTS in entry.needs and torch.is_inference_mode_enabled():
        return "needs gradients, which torch.inference_mode() forbids: run it outside inference mode"
    if reg.STAGES in entry.needs and not parts.stages:
        return f"needs the classifier's stage modules (timm's feature_info); {arch} names none"
    if reg.DROPOUT in entry.needs and not _has_dropout(parts.model):
        return f"needs dropout to sample with (Monte-Carlo dropout); {arch} has none (drop rate 0)"
    if reg.MAPS_4D in entry.needs:
        with torch.no_grad():
            shape = tuple(parts.feature_maps(parts.probe()).shape)
        if len(shape) != 4:
            return f"needs 4-D feature maps [B, C, H, W]; {arch}'s forward_features gives shape {shape}"
    return None


def _has_dropout(model: nn.Module) -> bool:
    modules = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    return modules or float(getattr(model, "drop_rate", 0.0) or 0.0) > 0


@dataclass
class Samples:
    """What the classifier detectors read of a set of samples: logits [N, C] and penultimate features [N, D]
    (computed once, by the caller), labels [N] (the class; -1 for OOD; None: unknown) and the images (only the
    detectors reading feature maps or images use them)."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: Optional[torch.Tensor] = None
    images: Images = None
    batch_size: int = 256

    def __len__(self) -> int:
        return len(self.logits)

    def rows(self, index) -> "Samples":
        """The samples ``index`` selects (a tensor of row indices)."""
        labels = None if self.labels is None else self.labels[index]
        images = self.images[index] if torch.is_tensor(self.images) else (
            torch.utils.data.Subset(self.images, index.tolist()) if self.images is not None else None)
        return Samples(self.logits[index], self.features[index], labels, images, self.batch_size)

    def image_batches(self, device: torch.device) -> Iterator[torch.Tensor]:
        """The images, ``batch_size`` at a time, on ``device``."""
        if self.images is None:
            raise DetectorUnavailable("this detector reads the images, and none were given")
        if torch.is_tensor(self.images):
            yield from (b.to(device) for b in self.images.split(self.batch_size))
            return
        for batch in DataLoader(self.images, batch_size=self.batch_size):
            yield (batch["image"] if isinstance(batch, dict) else batch[0]).to(device)

    def loader(self, device: torch.device) -> "_Loader":
        """(images, labels) batches, as pytorch-ood's ``fit(loader)`` takes them (iterable more than once)."""
        return _Loader(self, device)


class _Loader:
    def __init__(self, samples: Samples, device: torch.device):
        self.samples, self.device = samples, device

    def __iter__(self):
        s = self.samples
        labels = s.labels if s.labels is not None else torch.zeros(len(s), dtype=torch.long)
        return zip(s.image_batches(self.device), labels.split(s.batch_size))

    def __len__(self) -> int:
        return -(-len(self.samples) // self.samples.batch_size)


def fit(detector, entry: reg.Detector, parts: ClassifierParts, train: Samples):
    """Fit ``detector`` on InD training samples through the entry point for what it reads (a no-op for the
    detectors that learn nothing); labels, where a detector does not need them, only mark the samples InD.
    :class:`DetectorUnavailable` (one line) where the detector refuses these samples (e.g. a class missing)."""
    if not getattr(detector, "requires_fit", False):
        return detector
    labels = train.labels if train.labels is not None else torch.zeros(len(train), dtype=torch.long)
    try:
        if entry.reads == reg.LOGITS:
            return detector.fit_logits(train.logits.to(torch.float64), labels)
        if entry.reads == reg.FEATURES:
            if isinstance(detector, FeatureMapsDetector):
                return detector.fit_feature_maps(parts.pooled_maps(train.features), labels)
            return detector.fit_features(train.features, labels)
        if hasattr(detector, "fit_features"):  # e.g. Mahalanobis with input preprocessing: fitted on the features
            return detector.fit_features(train.features, labels)
        return detector.fit(train.loader(parts.device))
    except (ValueError, AssertionError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else "an assertion on its data failed"
        raise DetectorUnavailable(f"refuses these training samples ({entry.implementation}: {text})") from error


def predict(detector, entry: reg.Detector, parts: ClassifierParts, samples: Samples) -> torch.Tensor:
    """The detector's scores of ``samples``, float64 on the CPU (higher = more OOD).

    Logits enter in float64: in float32, 11 of Fashion-OOD's 5,400 InD validation samples tie at the same MSP
    (softmax saturation), moving MSP's validation AUROC by 1.1e-7."""
    if entry.reads == reg.LOGITS:
        logits = samples.logits.to(torch.float64)
        rows = logits.split(1) if entry.one_at_a_time else [logits]
        scores = torch.cat([detector.predict_logits(r).reshape(-1) for r in rows]) if len(logits) else logits[:, 0]
    elif entry.reads == reg.FEATURES:
        if isinstance(detector, FeatureMapsDetector):
            scores = detector.predict_feature_maps(parts.pooled_maps(samples.features))
        else:
            scores = detector.predict_features(samples.features)
    else:
        batches = [_predict_images(detector, entry, parts, x).detach().reshape(-1)
                   for x in samples.image_batches(parts.device)]
        scores = torch.cat(batches) if batches else torch.zeros(0)
    return scores.detach().to("cpu", torch.float64).reshape(-1)


def _predict_images(detector, entry: reg.Detector, parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:
    if entry.reads == reg.FEATURE_MAPS:
        with torch.no_grad():
            return detector.predict_feature_maps(parts.feature_maps(images))
    return detector.predict(images)  # the gradient detectors switch gradients on themselves
