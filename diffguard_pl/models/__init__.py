"""Model building, saving and loading (no Lightning needed)."""

from diffguard_pl.models.classifier import (
    Classifier,
    ClassifierSpec,
    MissingCheckpointError,
    build_classifier,
    load_classifier,
    save_classifier,
)
from diffguard_pl.models.diffusion import DiffusionModel, build_scheduler, build_unet, load_diffusion, save_diffusion

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
    "save_classifier",
    "save_diffusion",
]
