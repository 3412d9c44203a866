"""Grad-CAM of a classifier and the DSG mask built from it.

    cam = ReLU(sum_k w_k A_k),  w_k = mean over positions of d logit_y / d A_k

where A is the activation of one layer (default: the timm model's last
feature stage, ``feature_info[-1]["module"]``, e.g. ``layer4`` of a ResNet).
The map is resized (bilinear) to the image (for a centre-cropping classifier:
to the crop, placed where the crop came from, zero outside), min-max
normalised per image and thresholded; the mask is then resized (nearest) to the denoiser's resolution.

One forward and one backward pass per image; the forward hook is removed
before returning, also after an error. The classifier must be in eval mode,
so one image's map does not depend on the others in its batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffguard_pl.models.classifier import Classifier


def cam_layer_name(model: nn.Module, layer: Optional[str]) -> str:
    """The module Grad-CAM reads: ``layer`` if given, else the model's last feature stage."""
    if layer is not None:
        return layer
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(
            f"{type(model).__name__} has no feature_info to find its last stage; "
            "set diffguard.guidance.classifier_free.cam_layer"
        )
    last = info[-1] if isinstance(info, (list, tuple)) else info.get_dicts()[-1]
    return last["module"]


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        candidates = [n for n in modules if n and "." not in n]
        raise ValueError(
            f"diffguard.guidance.classifier_free.cam_layer={name!r} is not a module of {type(model).__name__}; "
            f"top-level modules: {candidates}"
        )
    return modules[name]


def grad_cam(
    classifier: Classifier, images01: torch.Tensor, labels: torch.Tensor, layer: Optional[str] = None
) -> torch.Tensor:
    """Grad-CAM for ``labels``: [N, 1, H, W] at the images' size, min-max normalised to [0, 1] per image."""
    module = _module(classifier.model, cam_layer_name(classifier.model, layer))
    captured: list = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            x = images01.detach().requires_grad_(True)  # so the activation is part of a graph
            logits = classifier(x)
            if len(captured) != 1:
                raise RuntimeError(f"cam layer {module.__class__.__name__} ran {len(captured)} times in one forward")
            activation = captured[0]
            target = logits.gather(1, labels.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(target, activation)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
    cam = classifier.view_to_image(cam, tuple(images01.shape[-2:]))  # resized, or placed where a crop came from
    low = cam.amin(dim=(2, 3), keepdim=True)
    high = cam.amax(dim=(2, 3), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-7)


def dsg_mask(cam: torch.Tensor, threshold: float, size: int) -> torch.Tensor:
    """The DSG mask [N, 1, size, size] (float 0/1): cam above ``threshold``, resized by nearest neighbour."""
    mask = (cam > threshold).to(cam.dtype)
    if mask.shape[-1] != size or mask.shape[-2] != size:
        mask = F.interpolate(mask, size=(size, size), mode="nearest")
    return mask
