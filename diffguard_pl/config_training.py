"""The schema of ``train.py`` (TrainConfig): the optimiser, the classifier, the diffusion model, co-training, joint
training and the contrastive encoder, on top of what every run shares (diffguard_pl/config_shared.py).

A field's ``# comment``, with the deeper-indented comment lines below it, is its ``--help`` text
(diffguard_pl/cli.py reads it from this source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from diffguard_pl.config_checks import check_choice, check_positive
from diffguard_pl.config_shared import EMBEDDED, RunConfig, neutral
from diffguard_pl.errors import ConfigError


@dataclass
class OptimConfig:
    """The optimiser and its learning-rate schedule."""

    name: str = "adamw"  # adamw | sgd (Nesterov momentum)
    lr: float = 1e-3  # peak learning rate, reached after the warmup
    weight_decay: float = 0.01  # decoupled (AdamW) or L2 (SGD) weight decay
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine (decay to 0 at the last step) | constant, both after a linear warmup
    warmup_steps: int = 100  # optimiser steps of linear warmup from 0 to lr

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, ["adamw", "sgd"])
        check_choice("optim.scheduler", self.scheduler, ["cosine", "constant"])


@dataclass
class ClassifierConfig:
    """The classifier (or the contrastive encoder's backbone): a timm model."""

    arch: str = "diffguard_resnet_tiny"  # any name timm.create_model knows (diffguard_resnet_tiny: this
                                         # project's small ResNet)
    pretrained_path: Optional[str] = None  # local weights to start from (safetensors or torch state dict); a
                                           # different head is replaced; null: random initialisation
    mean: Optional[List[float]] = None  # normalisation mean per channel of [0, 1] images; null: 0.5 per channel
    std: Optional[List[float]] = None  # normalisation standard deviation per channel; null: 0.5 per channel
    input_size: Optional[int] = None  # side in pixels the classifier sees; null: data.resolution
    drop_rate: float = 0.0  # dropout before the classification head (timm's drop_rate)
    label_smoothing: float = 0.0  # of the cross-entropy targets, in [0, 1)
    augment_shift: int = 1  # random translation in pixels during training (0: none)
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)  # further timm.create_model arguments,
                                                               # e.g. {drop_path_rate: 0.1}


@dataclass
class DiffusionConfig:
    """A diffusers UNet2DModel trained as an epsilon-predicting DDPM."""

    conditional: bool = False  # class-conditional with a null class for classifier-free guidance
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64, 64])  # UNet channels per resolution level
    layers_per_block: int = 2  # residual blocks per level
    attention_levels: List[bool] = field(default_factory=lambda: [False, False, True])  # self-attention per level
    attention_head_dim: int = 32  # channels per attention head
    num_train_timesteps: int = 1000  # timesteps of the DDPM training schedule
    beta_schedule: str = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2 (cosine)
    label_dropout: float = 0.1  # probability of replacing the label by the null class, in [0, 1)
    ema_decay: float = 0.999  # of the exponential moving average of the weights (the exported model)
    dropout: float = 0.0  # inside the UNet's residual blocks
    augment_shift: int = 0  # random translation in pixels of training images (0: none)

    def __post_init__(self) -> None:
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError(
                "diffusion.attention_levels needs one entry per diffusion.block_out_channels entry"
            )
        check_choice(
            "diffusion.beta_schedule", self.beta_schedule, ["linear", "scaled_linear", "squaredcos_cap_v2"]
        )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"diffusion.label_dropout={self.label_dropout} must lie in [0, 1)")


@dataclass
class CoTrainConfig:
    """Co-training (task=cotrain) and joint training (task=joint) of the classifier with a diffusion model.

    Each step, InD training images are noised to x_t at timesteps drawn uniformly
    from [t_min, t_max] (the diffusion model's training schedule, inclusive); the
    diffusion model's clean estimate x0_pred(x_t), mapped to [0, 1], is classified
    as well as the real image. Classifier loss: (1 - weight) * CE(real) + weight *
    CE(clean estimate). cotrain keeps the diffusion model frozen; joint also
    fine-tunes it with denoising MSE + ce_weight * CE(classifier(x0_pred), y),
    the gradient flowing through the UNet (its own optimiser, diffusion_lr).
    """

    diffusion_path: str = str(EMBEDDED / "digits" / "diffusion_uncond")  # diffusers folder to load
    t_min: int = 0  # lowest timestep x_t is drawn at, in the diffusion model's training timesteps (0: clean)
    t_max: int = 700  # highest timestep x_t is drawn at (inclusive). Cover the timestep the evaluation's
                      # synthesis starts from: about diffguard.depth / diffguard.num_steps of the training
                      # schedule's length (diffusion.num_train_timesteps)
    weight: float = 0.5  # share of the clean-estimate term in the classifier's loss, in [0, 1]
    clean: str = "x0_pred"  # what the classifier sees: x0_pred | blend (f x0_pred + (1-f) x_t with
                            # f = sqrt(1 - alpha_bar_t), as guidance does)
    clamp: bool = False  # clamp the clean estimate to [-1, 1]; guidance does not, so off by default
    diffusion_lr: float = 1e-4  # joint: AdamW lr of the UNet (same warmup / schedule as optim)
    diffusion_weight_decay: float = 0.0  # joint: AdamW weight decay of the UNet
    ce_weight: float = 0.01  # joint: weight of the classifier's CE in the UNet's loss
    ema_decay: float = 0.99  # joint: EMA of the fine-tuned UNet (starts at the loaded weights), exported; 0 = raw

    def __post_init__(self) -> None:
        check_choice("cotrain.clean", self.clean, ["x0_pred", "blend"])
        if not 0 <= self.t_min <= self.t_max:
            raise ConfigError(f"cotrain.t_min={self.t_min}, cotrain.t_max={self.t_max}: need 0 <= t_min <= t_max")
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"cotrain.weight={self.weight} must lie in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"cotrain.ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.ce_weight < 0:
            raise ConfigError(f"cotrain.ce_weight={self.ce_weight} must be >= 0")


@dataclass
class ContrastiveConfig:
    """The contrastive encoder (task=contrastive), trained on InD training images only.

    Its backbone is ``classifier.arch`` (diffguard_pl/modules/contrastive.py). Two views per image: a random
    square crop (area fraction >= ``crop_min_scale``) resized back, mirrored with probability 1/2 (``flip``),
    contrast / brightness jitter of strength ``jitter``, and a light blur with probability ``blur_probability``.
    ``supervised``: views of images of the same InD class are positives (supervised contrastive loss); false:
    only the two views of one image (SimCLR).
    """

    supervised: bool = True  # true: supervised contrastive (same InD class = positive); false: SimCLR
    temperature: float = 0.1  # of the contrastive softmax, > 0 (lower: sharper)
    projection_dim: int = 64  # output of the projection head (used in training only)
    crop_min_scale: float = 0.6  # smallest area fraction of a view's random square crop, in (0, 1]
    flip: bool = True  # mirror each view with probability 1/2
    jitter: float = 0.4  # strength of the contrast / brightness jitter, in [0, 1)
    blur_probability: float = 0.5  # probability of a light blur per view, in [0, 1]

    def __post_init__(self) -> None:
        check_positive("contrastive.temperature", self.temperature)
        check_positive("contrastive.projection_dim", self.projection_dim)
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"contrastive.crop_min_scale={self.crop_min_scale} must lie in (0, 1]")
        if not 0.0 <= self.jitter < 1.0 or not 0.0 <= self.blur_probability <= 1.0:
            raise ConfigError("contrastive.jitter must lie in [0, 1) and contrastive.blur_probability in [0, 1]")


@dataclass
class TrainConfig(RunConfig):
    """Root schema of ``train.py``: a classifier, a diffusion model, or both (co-training, joint training)."""

    task: str = MISSING  # what to train: classifier | diffusion | cotrain (a classifier on a frozen diffusion
                         # model's clean estimates too) | joint (classifier and diffusion model together) |
                         # contrastive (the encoder of distance contrastive)
    output_dir: str = neutral("outputs/train")  # checkpoints/, the exported model, logs, metrics.json
    resume: Optional[str] = None  # continue from a Lightning checkpoint (e.g. OUT/checkpoints/last.ckpt); null: start
    monitor: Optional[str] = None  # a validation metric, e.g. val/loss: export the best weights by it; null: the last
    monitor_mode: str = "min"  # min | max: whether a lower or a higher monitor value is better
    optim: OptimConfig = field(default_factory=OptimConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    cotrain: CoTrainConfig = field(default_factory=CoTrainConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("task", self.task, ["classifier", "diffusion", "cotrain", "joint", "contrastive"])
        check_choice("monitor_mode", self.monitor_mode, ["min", "max"])
