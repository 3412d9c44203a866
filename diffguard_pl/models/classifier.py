"""Classifiers: any timm architecture, wrapped with its own preprocessing.

Portable format (loads without Lightning): a folder with ``model.safetensors``
(the timm model's state dict) and ``classifier.json`` (architecture name,
number of classes, input channels and size, normalisation, timm kwargs).

This module also registers ``diffguard_resnet_tiny`` in timm's registry: a
small pre-activation ResNet for low-resolution inputs (the embedded
benchmark's default), created like any other timm model.
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
from timm.models import register_model

WEIGHTS_FILE = "model.safetensors"
META_FILE = "classifier.json"


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint path that does not exist; the message says how to make it."""


# --------------------------------------------------------------------------- tiny ResNet


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        return skip + self.conv2(F.relu(self.bn2(h)))


class TinyResNet(nn.Module):
    """Pre-activation ResNet with stride-1 stem, for 8-32 px inputs. timm model interface."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple = (32, 64, 128),
        depths: tuple = (1, 1, 1),
        drop_rate: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [_PreActBlock(cin if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(cin)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": w, "reduction": 2**i, "module": f"stages.{i}"} for i, w in enumerate(widths)
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.stages(self.stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def diffguard_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> TinyResNet:
    if pretrained:
        raise ValueError("diffguard_resnet_tiny has no downloadable weights; pass a local checkpoint instead")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return TinyResNet(**kwargs)


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


def load_state_dict_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state dict (optionally under 'state_dict' / 'model')."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"Classifier weights not found at {path}: check classifier.pretrained_path.")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


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
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(images))

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled penultimate features) from one forward pass."""
        feats = self.model.forward_head(self.model.forward_features(self.prepare(images)), pre_logits=True)
        return self.model.get_classifier()(feats), feats


def _load_backbone(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load pretrained weights; only the classification head may differ (another class count)."""
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    own = model.state_dict()
    head_keys = {f"{prefix}.{k}" for k in head.state_dict()}
    state = {k: v for k, v in state.items() if not (k in head_keys and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - head_keys)
    if missing or unexpected:
        raise ValueError(
            f"weights in {source} do not fit this architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_classifier(spec: ClassifierSpec, pretrained_path: Optional[str | Path] = None) -> Classifier:
    model = create_timm_model(spec.arch, spec.num_classes, spec.in_chans, **spec.timm_kwargs)
    if pretrained_path is not None:
        _load_backbone(model, load_state_dict_file(pretrained_path), str(pretrained_path))
    return Classifier(model, spec)


def save_classifier(classifier: Classifier, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / META_FILE).write_text(json.dumps(asdict(classifier.spec), indent=2))
    return directory


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
