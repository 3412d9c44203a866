"""The Python API: presets by name and detectors with one interface, without Lightning.

    from diffguard_pl.api import Baseline, DiffGuard, load_preset

    detector = DiffGuard.from_preset("digits_gdm")     # conf/digits_gdm.yaml, its models loaded
    scores = detector.fit(train_images).score(images)  # images [N, C, H, W] in [0, 1]; higher = more OOD
    knn = Baseline("knn", detector.classifier, k=50).fit(train_images)
    knn.score(images)

Every detector has ``fit(data)`` (a tensor of InD training images in [0, 1], a DataLoader of such batches
(tensors, (images, labels) pairs or dicts with "image"), or nothing for detectors that learn nothing) and
``score(images)`` returning one float64 score per image, higher meaning more OOD (``predict`` is the same,
the name pytorch-ood uses). Images are always in [0, 1]; anything else is an error, not a guess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from diffguard_pl.detectors.baselines import (
    BaselineStats, default_vim_dim, energy, fit_baselines, knn_score, max_logit, msp, vim_score,
)
from diffguard_pl.config import EvalConfig, compose, to_object
from diffguard_pl.errors import ConfigError
from diffguard_pl.models import Classifier, load_classifier, load_diffusion

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


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {type(images).__name__} "
                         f"{getattr(images, 'shape', '')}")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"images must lie in [0, 1], got [{float(images.min()):.3f}, {float(images.max()):.3f}]; "
                         f"images in [-1, 1] map to it as (x + 1) / 2")
    return images


def _batches(data: Data, batch_size: int = 256):
    """Image batches from a tensor or an iterable of batches (tensors, (images, labels), or dicts)."""
    if torch.is_tensor(data):
        yield from (_check_images(data[i: i + batch_size]) for i in range(0, len(data), batch_size))
        return
    for batch in data:
        images = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        yield _check_images(images)


class DiffGuard:
    """DiffGuard as a detector: the distance between an image and its synthesis under the predicted label."""

    def __init__(self, pipeline, score: Optional[str] = None):
        self.pipeline = pipeline
        self.distance = score or pipeline.cfg.score

    @classmethod
    def from_preset(cls, name: str, *overrides: str, device: Union[str, torch.device] = "cpu") -> "DiffGuard":
        from diffguard_pl.method.pipeline import DiffGuardPipeline

        from diffguard_pl.jobs.eval_data import load_encoder

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
        return self.pipeline(_check_images(images), ids)

    def score(self, images: torch.Tensor, ids: Optional[Sequence[str]] = None) -> torch.Tensor:
        """One score per image (the configured distance, float64), higher = more OOD."""
        return self(images, ids)["scores"][self.distance].double().cpu()

    predict = score


class Baseline:
    """A classifier-based detector: ``msp``, ``ebo``, ``maxlogit`` (nothing to fit), ``knn`` and ``vim``
    (fitted on InD training images: ``k`` nearest neighbours, ``dim`` principal dimensions)."""

    NAMES = ("msp", "ebo", "maxlogit", "knn", "vim")

    def __init__(self, name: str, classifier: Classifier, k: int = 50, dim: Optional[int] = None):
        if name not in self.NAMES:
            raise ValueError(f"unknown baseline {name!r}: choose one of {self.NAMES}")
        self.name, self.classifier, self.k, self.dim = name, classifier.eval(), k, dim
        self.stats: Optional[BaselineStats] = None

    @torch.no_grad()
    def _outputs(self, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.classifier.parameters()).device
        logits, feats = [], []
        for images in _batches(data):
            lo, fe = self.classifier.forward_with_features(images.to(device))
            logits.append(lo.float().cpu())
            feats.append(fe.float().cpu())
        return torch.cat(logits), torch.cat(feats)

    def fit(self, data: Optional[Data] = None) -> "Baseline":
        """KNN / ViM: fit on InD training images; the logit-only detectors ignore ``data``."""
        if self.name in ("knn", "vim"):
            if data is None:
                raise ValueError(f"{self.name} is fitted on InD training images: pass them to fit()")
            logits, feats = self._outputs(data)
            head = self.classifier.model.get_classifier()
            dim = self.dim or default_vim_dim(feats.shape[1])
            self.stats = fit_baselines(feats, logits, head.weight.detach().cpu(), head.bias.detach().cpu()
                                       if head.bias is not None else None, knn_k=min(self.k, len(feats)), vim_dim=dim)
        return self

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """One score per image (float64), higher = more OOD."""
        if self.name in ("knn", "vim") and self.stats is None:
            raise RuntimeError(f"{self.name} is not fitted yet: call fit(train_images) first")
        logits, feats = self._outputs(_check_images(images))
        if self.name == "knn":
            return knn_score(self.stats, feats)
        if self.name == "vim":
            return vim_score(self.stats, logits, feats)
        return {"msp": msp, "ebo": energy, "maxlogit": max_logit}[self.name](logits)

    predict = score
