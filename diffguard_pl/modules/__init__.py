"""LightningModules: thin wrappers around the models and the pure functions."""

from diffguard_pl.modules.classifier_module import ClassifierModule
from diffguard_pl.modules.diffusion_module import DiffusionModule
from diffguard_pl.modules.joint_module import JointModule

__all__ = ["ClassifierModule", "DiffusionModule", "JointModule"]
