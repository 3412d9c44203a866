"""Classifiers: any timm architecture, wrapped with its own preprocessing.

Weight files of other formats (timm, torchvision, OpenOOD checkpoints) are read by
:mod:`diffguard_pl.models.classifier_files` (``classifier.pretrained_path``).

Portable format (loads without Lightning): a folder with ``model.safetensors``
(the timm model's state dict) and ``classifier.json`` (architecture name,
number of classes, input channels and size, normalisation, timm kwargs, and
what train.py records: the class names and ``trained_on``).

This project's own architectures, ``diffguard_resnet_tiny`` (:mod:`diffguard_pl.models.tiny_resnet`) and
``openood_resnet18_32x32`` (:mod:`diffguard_pl.models.openood`), are registered in timm's registry by
``diffguard_pl.models`` (its ``__init__``), so they are created like any other timm model.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffguard_pl.errors import MissingCheckpointError
from diffguard_pl.models.classifier_files import load_backbone, load_state_dict_file

WEIGHTS_FILE = "model.safetensors"
META_FILE = "classifier.json"


# --------------------------------------------------------------------------- building and loading


@dataclass
class ClassifierSpec:
    """Everything needed to rebuild a classifier and feed it correctly."""

    arch: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: List[float]
    std: List[float]
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    class_names: Optional[List[str]] = None
    # How an image of another size reaches input_size: "resize" (bilinear, antialiased) or "center_crop" (the
    # central input_size square of a larger image: ImageNet's resize 256 / crop 224 from a 256 px image).
    view: str = "resize"
    # What train.py measured at export, so that an evaluation can tell a classifier of another benchmark
    # (diffguard_pl/detectors/classifier_check.py): {"benchmark": its name, "validation_accuracy": the fraction
    # right on its InD validation split, "validation_images": how many}. None: not recorded (older folders,
    # classifiers from elsewhere).
    trained_on: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.view not in ("resize", "center_crop"):
            raise ValueError(f"classifier view {self.view!r} is not one of resize, center_crop")


def create_timm_model(arch: str, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without downloads, with a helpful error for unknown names."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"Unknown timm architecture {arch!r} (classifier.arch).{hint} "
            "List the available names with `python -c \"import timm; print(timm.list_models('*resnet*'))\"`."
        )
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


class Classifier(nn.Module):
    """A timm model behind its preprocessing: takes images in [0, 1] at any size.

    Inputs are resized to the classifier's input size (the diffusion model and
    the classifier may run at different resolutions) and normalised.
    """

    def __init__(self, model: nn.Module, spec: ClassifierSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.spec.in_chans:
            raise ValueError(
                f"classifier expects [N, {self.spec.in_chans}, H, W] images, got shape {tuple(images.shape)}"
            )
        size = self.spec.input_size
        if images.shape[-2:] != (size, size):
            if self.spec.view == "center_crop":
                images = _center_crop(images, size)
            else:
                images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    def view_to_image(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Maps over the classifier's view [N, C, h, w] placed on an image of ``size`` (bilinear; 0 outside a crop)."""
        if self.spec.view != "center_crop" or size == (self.spec.input_size, self.spec.input_size):
            return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        crop = self.spec.input_size
        if min(size) < crop:
            raise ValueError(f"a {size} image is smaller than the classifier's {crop} px centre crop")
        inside = F.interpolate(maps, size=(crop, crop), mode="bilinear", align_corners=False)
        top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
        return F.pad(inside, (left, size[1] - crop - left, top, size[0] - crop - top))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(images))

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled penultimate features) from one forward pass."""
        feats = self.model.forward_head(self.model.forward_features(self.prepare(images)), pre_logits=True)
        return self.model.get_classifier()(feats), feats


def _center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size} px from {height}x{width} images (classifier view center_crop)")
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def build_classifier(spec: ClassifierSpec, pretrained_path: Optional[str | Path] = None) -> Classifier:
    model = create_timm_model(spec.arch, spec.num_classes, spec.in_chans, **spec.timm_kwargs)
    if pretrained_path is not None:
        load_backbone(model, load_state_dict_file(pretrained_path), str(pretrained_path), spec.arch)
    return Classifier(model, spec)


def save_classifier(classifier: Classifier, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    save_spec(classifier.spec, directory)
    return directory


def save_spec(spec: ClassifierSpec, directory: str | Path) -> Path:
    """``classifier.json`` alone (the weights untouched): e.g. train.py's record added after the export."""
    path = Path(directory) / META_FILE
    path.write_text(json.dumps(asdict(spec), indent=2))
    return path


def load_classifier(directory: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """Load a classifier saved by :func:`save_classifier`, in eval mode."""
    directory = Path(directory)
    meta, weights = directory / META_FILE, directory / WEIGHTS_FILE
    if not meta.is_file() or not weights.is_file():
        raise MissingCheckpointError(
            f"No classifier checkpoint at {directory} (expected {META_FILE} and {WEIGHTS_FILE}). "
            f"Train one with `python train.py --config conf/train_classifier.yaml output_dir=OUT` "
            f"and use OUT/classifier."
        )
    spec = ClassifierSpec(**json.loads(meta.read_text()))
    classifier = build_classifier(spec)
    classifier.model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
    return classifier.eval()
