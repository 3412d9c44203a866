"""LightningModules: thin wrappers around the models and the pure functions."""

from diffguard_pl.modules.classifier_module import ClassifierModule
from diffguard_pl.modules.diffusion_module import DiffusionModule

__all__ = ["ClassifierModule", "DiffusionModule"]
