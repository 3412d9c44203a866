"""Model building, saving and loading (no Lightning needed).

Importing this package registers the project's own classifier architectures in timm's registry
(:func:`register_timm_models`), so every timm call knows them."""

import timm
from timm.models import register_model

from diffguard_pl.errors import MissingCheckpointError
from diffguard_pl.models.classifier import (
    Classifier, ClassifierSpec, build_classifier, load_classifier, save_classifier,
)
from diffguard_pl.models.diffusion import DiffusionModel, build_scheduler, build_unet, load_diffusion, save_diffusion
from diffguard_pl.models.openood import openood_resnet18_32x32
from diffguard_pl.models.tiny_resnet import diffguard_resnet_tiny


def register_timm_models() -> None:
    """Add ``diffguard_resnet_tiny`` and ``openood_resnet18_32x32`` to timm's model registry (under their entry
    points' names); a second call changes nothing."""
    for entry_point in (diffguard_resnet_tiny, openood_resnet18_32x32):
        if not timm.is_model(entry_point.__name__):
            register_model(entry_point)


register_timm_models()

__all__ = [
    "Classifier",
    "ClassifierSpec",
    "DiffusionModel",
    "MissingCheckpointError",
    "build_classifier",
    "build_scheduler",
    "build_unet",
    "load_classifier",
    "load_diffusion",
    "register_timm_models",
    "save_classifier",
    "save_diffusion",
]
