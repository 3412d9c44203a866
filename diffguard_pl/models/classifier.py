"""Classifiers: any timm architecture, wrapped with its own preprocessing.

Supported weight files (``classifier.pretrained_path``; ``.safetensors`` or a
torch pickle read with ``weights_only=True``). A torch file may hold the
state dict itself or under a ``state_dict`` / ``model`` / ``net`` key, and a
``module.`` prefix (DataParallel / DDP) or ``_orig_mod.`` (torch.compile) is
removed. Every key must match the architecture; only the classification head
may differ in shape (it is then left freshly initialised, for another class
count).

* timm by name: ``arch`` is any ``timm.list_models()`` name and the file is
  that model's state dict (e.g. a timm/Hugging Face ``model.safetensors``).
* torchvision ResNets: ``torchvision.models.resnet{18,34,50,101,152}`` state
  dicts (e.g. ``resnet50-0676ba61.pth`` or ``IMAGENET1K_V2``) load into timm's
  ``resnet18`` .. ``resnet152`` as they are: same key names (``conv1``,
  ``bn1``, ``layer1..4`` with ``downsample.0/1``, ``fc``) and the same
  architecture (v1.5: stride on the 3x3 conv). Use ImageNet mean/std and
  input size 224.
* OpenOOD v1.5 CIFAR ResNet-18 (``ResNet18_32x32``, e.g.
  ``cifar10_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt``):
  ``arch: openood_resnet18_32x32`` (see :mod:`diffguard_pl.models.openood`),
  input size 32, OpenOOD's CIFAR-10 mean/std.

A file that does not fit raises ``ValueError`` naming the file, the
architecture, a few missing / unexpected keys and, where the keys are
recognisable, the ``arch`` they look like.

Portable format (loads without Lightning): a folder with ``model.safetensors``
(the timm model's state dict) and ``classifier.json`` (architecture name,
number of classes, input channels and size, normalisation, timm kwargs).

This module also registers ``diffguard_resnet_tiny`` in timm's registry: a
small pre-activation ResNet for low-resolution inputs (the embedded
benchmark's default), created like any other timm model.
"""

from __future__ import annotations

import difflib
import importlib
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
from diffguard_pl.errors import MissingCheckpointError  # noqa: F401  (re-exported)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "classifier.json"


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
    # How an image of another size reaches input_size: "resize" (bilinear, antialiased) or "center_crop" (the
    # central input_size square of a larger image: ImageNet's resize 256 / crop 224 from a 256 px image).
    view: str = "resize"

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


_WRAPPER_KEYS = ("state_dict", "model", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: under 'state_dict' / 'model' / 'net' if present, without 'module.' prefixes."""
    while isinstance(state, dict):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        what = f"keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{source} holds no state dict (found {what}); expected the tensors at the top level "
            f"or under one of {list(_WRAPPER_KEYS)}"
        )
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state dict (optionally under 'state_dict' / 'model' / 'net',
    optionally with the 'module.' prefix of DataParallel / DDP)."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"Classifier weights not found at {path}: check classifier.pretrained_path.")
    if path.suffix == ".safetensors":
        return _unwrap_state_dict(load_file(str(path)), str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise ValueError(
            f"Could not read classifier weights {path} as a torch state dict (weights_only=True): {err}"
        ) from err
    return _unwrap_state_dict(state, str(path))


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


_TORCHVISION_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def guess_arch(keys: Any) -> str | None:
    """Which ``classifier.arch`` a state dict's key names look like, in words; None if unrecognised."""
    keys = set(keys)
    if "layer1.0.conv1.weight" in keys and "conv1.weight" in keys:
        depths = tuple(
            len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()})
            for i in range(1, 5)
        )
        if any(".shortcut." in k for k in keys):
            if "layer1.0.conv3.weight" not in keys and depths == (2, 2, 2, 2):
                return "openood_resnet18_32x32 (OpenOOD's ResNet18_32x32)"
            return "a CIFAR-style ResNet with 'shortcut' blocks (OpenOOD / kuangliu layout), depths " + str(depths)
        kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
        name = _TORCHVISION_RESNETS.get((kind, depths))
        if name:
            return f"{name} (torchvision / timm ResNet layout)"
        return f"a torchvision / timm ResNet with {kind} blocks, depths {depths}"
    if "conv1.0.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "a timm ResNet with a deep stem (e.g. resnet10t, resnet26d, resnet50d)"
    if any(k.startswith("stem.") for k in keys) and any(k.startswith("stages.0.0.bn1.") for k in keys):
        return "diffguard_resnet_tiny (this project's small ResNet; check timm_kwargs widths / depths)"
    if any(k.startswith("patch_embed.") for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "a timm vision transformer (e.g. vit_small_patch16_224, deit_*)"
    if any(k.startswith("stem.") for k in keys) and any(k.startswith("stages.") for k in keys):
        return "a timm model with stem / stages (e.g. convnext_*, regnet*, efficientvit*)"
    if any(k.startswith("features.") for k in keys) and any(k.startswith("classifier.") for k in keys):
        return "a torchvision features / classifier model (VGG, DenseNet, MobileNet...), not a timm layout"
    return None


def _common_prefix_hint(keys: list[str], own: set) -> str:
    """' The keys carry the prefix 'p.' ...' when stripping a shared prefix makes them fit."""
    first = keys[0].split(".")
    for n in range(1, min(4, len(first))):
        prefix = ".".join(first[:n]) + "."
        if all(k.startswith(prefix) for k in keys) and {k[len(prefix) :] for k in keys} & own:
            return f" The keys carry the prefix {prefix!r} (a training checkpoint?); save the inner model's state dict."
    return ""


def _center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size} px from {height}x{width} images (classifier view center_crop)")
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str = "?") -> None:
    """Load pretrained weights; only the classification head may differ (another class count)."""
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    own = model.state_dict()
    head_keys = {f"{prefix}.{k}" for k in head.state_dict()}
    state = {k: v for k, v in state.items() if not (k in head_keys and v.shape != own[k].shape)}
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    # BatchNorm fills in a missing num_batches_tracked itself (older checkpoints lack it)
    missing = sorted(k for k in set(own) - set(state) - head_keys if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected or wrong_shape:
        guess = guess_arch(state)
        hint = ""
        if guess and not guess.startswith(f"{arch} "):
            hint = f" These keys look like {guess}: set classifier.arch accordingly."
        hint += _common_prefix_hint(sorted(state), set(own)) if state else ""
        raise ValueError(
            f"Classifier weights in {source} do not fit arch {arch!r} ({len(state)} keys in the file, "
            f"{len(own)} in the model): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            + (f", wrong shapes {wrong_shape[:5]}{' ...' if len(wrong_shape) > 5 else ''}" if wrong_shape else "")
            + f".{hint}"
        )
    model.load_state_dict(state, strict=False)


def build_classifier(spec: ClassifierSpec, pretrained_path: Optional[str | Path] = None) -> Classifier:
    model = create_timm_model(spec.arch, spec.num_classes, spec.in_chans, **spec.timm_kwargs)
    if pretrained_path is not None:
        _load_backbone(model, load_state_dict_file(pretrained_path), str(pretrained_path), spec.arch)
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


# Register the OpenOOD architectures in timm whenever classifiers are used (kept last: no import cycle).
importlib.import_module("diffguard_pl.models.openood")
