"""Classifier weight files: reading a checkpoint and loading it into a timm model.

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
recognisable, the ``arch`` they look like (:func:`guess_arch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from diffguard_pl.errors import MissingCheckpointError

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


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str = "?") -> None:
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


__all__ = [
    "guess_arch",
    "load_backbone",
    "load_state_dict_file",
]
