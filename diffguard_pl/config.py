"""Typed configuration: every default lives in the dataclasses below.

YAML files in ``conf/`` and ``key=value`` command-line overrides only change
values that the schema already declares. An unknown key, a value of the wrong
type or a missing required value raises :class:`ConfigError` naming the key,
before any work starts.
"""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffguard_pl.detectors import registry
from diffguard_pl.errors import ConfigError  # noqa: F401  (re-exported: the schema's error)

T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the folder holding conf/ and checkpoints/
EMBEDDED = PROJECT_ROOT / "checkpoints"
PRESETS = PROJECT_ROOT / "conf"  # --config NAME finds conf/NAME.yaml here


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(choices)}")


def _check_positive(key: str, value: Optional[float], allow_none: bool = False, allow_zero: bool = False) -> None:
    """A count or scale that must be a finite number above zero (or at least zero)."""
    if value is None and allow_none:
        return
    bad = value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        kind = "a whole number" if isinstance(value, int) else "a finite number"
        rule = f"{kind} >= 0" if allow_zero else f"{kind} > 0"
        raise ConfigError(f"{key}={value} is not allowed: use {rule}")


def neutral(default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A field that never changes a sample's score: where and how a run executes and logs (not fingerprinted,
    see diffguard_pl/jobs/records.py)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"neutral": True})
    return field(default=default, metadata={"neutral": True})


def parse_shard(spec: Optional[str]) -> Optional[tuple]:
    """``"i/n"`` -> (i, n): the samples whose index modulo n is i; ConfigError naming the key otherwise."""
    if spec is None:
        return None
    try:
        index, count = (int(part) for part in str(spec).split("/"))
    except ValueError:
        raise ConfigError(f"shard={spec!r} must look like i/n, e.g. shard=0/4") from None
    if not 0 <= index < count:
        raise ConfigError(f"shard={spec!r}: need 0 <= i < n (e.g. shard=1/2 is the second of two halves)")
    return index, count


@dataclass
class DataConfig:
    """Which benchmark to build and how its images are preprocessed.

    benchmark digits: the embedded Digits-OOD benchmark (built from installed packages).
    benchmark cifar10 / imagenet: OpenOOD v1.5 image lists under ``root`` (the folder holding
    benchmark_imglist/, images_classic/, images_largescale/), see diffguard_pl/data/image_lists.py.
    benchmark lists: your own image lists or folders, described by ``definition``::

        definition:
          num_classes: 10
          ind: {train: {list: lists/train.txt, data_dir: images}, val: {...}, test: {...}}
          ood: {my_set: {group: far, val: null, test: {folder: my_set_images}}}
    """

    benchmark: str = "digits"  # digits | fashion (embedded, built from installed packages) | cifar10 | imagenet
                               # (OpenOOD v1.5 image lists under data.root) | lists (your own, see data.definition)
    resolution: int = 16  # side in pixels every set is resized to (resolution x resolution: the diffusion model's)
    channels: int = 1  # 1 (grayscale) | 3 (RGB)
    seed: int = 0  # fixes the InD / OOD splits and the generated OOD sets
    root: Optional[str] = None  # data folder. cifar10 / imagenet: OpenOOD's (benchmark_imglist/, images_classic/,
                                # images_largescale/); lists: the base of relative paths; fashion: a folder with
                                # Fashion-MNIST's IDX files (null: Debian's dataset-fashion-mnist package);
                                # digits: unused
    definition: Optional[Dict[str, Any]] = None  # benchmark=lists only: {num_classes: N, ind: {train, val, test},
                                                 # ood: {NAME: {group: near | far, val, test}}}, each split a
                                                 # {list: FILE, data_dir: DIR} or a {folder: DIR} (or null)
    preprocess: Optional[str] = None  # resize | resize_center_crop; null: the benchmark's standard one
    resize: Optional[int] = None  # resize_center_crop: shorter side in pixels before the crop; null: the standard ratio
    on_error: str = "raise"  # raise (bad list lines / unreadable images stop the run) | skip (dropped and counted)
    allow_grayscale: bool = False  # convert grayscale images in an RGB benchmark (counted in results.json)
    verify_files: Optional[bool] = None  # decode every image up front; null: only with on_error=skip
    decode_workers: int = neutral(4)  # threads that verify images up front
    ind_classes: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])  # digits / fashion: the source
                                                                                # labels that are InD (relabelled 0..)
    near_ood_classes: List[int] = field(default_factory=lambda: [6, 7, 8, 9])  # digits / fashion: the labels of
                                                                               # the near-OOD set
    val_fraction: float = 0.15  # share of the InD training images held out for validation, stratified by class
    test_fraction: float = 0.25  # digits: share of the InD images held out for testing (fashion: the official test set)
    ood_samples_per_set: int = 300  # images per generated OOD set (digits: also caps digits_6to9), before the split
    ood_val_fraction: float = 0.2  # share of every OOD set drawn for its validation split (the rest is test)
    batch_size: int = neutral(64)  # images per training batch
    eval_batch_size: int = neutral(64)  # images per evaluation batch (a GPU takes 256 or more)
    num_workers: int = neutral(0)  # DataLoader worker processes

    def __post_init__(self) -> None:
        _check_choice("data.benchmark", self.benchmark, ["digits", "fashion", "cifar10", "imagenet", "lists"])
        _check_choice("data.channels", self.channels, [1, 3])
        _check_choice("data.on_error", self.on_error, ["raise", "skip"])
        if self.preprocess is not None:
            _check_choice("data.preprocess", self.preprocess, ["resize", "resize_center_crop"])
        if self.benchmark not in ("digits", "fashion") and self.root is None:
            raise ConfigError(f"data.benchmark={self.benchmark} reads image files: set data.root=/path/to/data")
        if self.benchmark == "lists" and self.definition is None:
            raise ConfigError("data.benchmark=lists needs data.definition (num_classes, ind, ood; see DataConfig)")
        if self.resolution < 8:
            raise ConfigError(f"data.resolution={self.resolution} is too small; use 8 or more")
        if set(self.ind_classes) & set(self.near_ood_classes):
            raise ConfigError("data.ind_classes and data.near_ood_classes must not overlap")
        for key in ("val_fraction", "test_fraction", "ood_val_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{key}={value} must lie in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction + data.test_fraction must be below 1")
        for key in ("batch_size", "eval_batch_size"):
            _check_positive(f"data.{key}", getattr(self, key))
        if self.num_workers < 0 or self.decode_workers < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.decode_workers >= 1")


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
        _check_choice("optim.name", self.name, ["adamw", "sgd"])
        _check_choice("optim.scheduler", self.scheduler, ["cosine", "constant"])


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
        _check_choice(
            "diffusion.beta_schedule", self.beta_schedule, ["linear", "scaled_linear", "squaredcos_cap_v2"]
        )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"diffusion.label_dropout={self.label_dropout} must lie in [0, 1)")


@dataclass
class TrainerConfig:
    """Where and how long Lightning runs (passed to lightning.Trainer)."""

    accelerator: str = neutral("cpu")  # cpu | gpu | auto (any name lightning.Trainer takes)
    devices: int = neutral(1)  # processes (GPUs) per node; -1: all
    num_nodes: int = neutral(1)  # machines of a multi-node run
    strategy: str = neutral("auto")  # auto | ddp | any other strategy name lightning.Trainer takes
    precision: str = "32-true"  # 32-true | 64-true | bf16-mixed | 16-mixed (Lightning's names); changes the scores
    max_steps: int = neutral(-1)  # train.py: stop after this many optimiser steps; -1: no limit (max_epochs decides)
    max_epochs: Optional[int] = neutral(None)  # train.py: stop after this many epochs; null: Lightning's default
                                               # (1000) unless max_steps is set
    log_every_n_steps: int = neutral(20)  # train.py: training metrics are logged every this many steps
    check_val_every_n_epoch: int = neutral(1)  # train.py: validate after every this many epochs
    limit_train_batches: Optional[float] = neutral(None)  # train.py: batches per epoch, a share in [0, 1] (1: all)
                                                          # or a whole count above 1; null: all
    limit_val_batches: Optional[float] = neutral(None)  # train.py: validation batches, a share in [0, 1] (1: all)
                                                        # or a whole count above 1; null: all
    enable_progress_bar: bool = neutral(True)  # Lightning's progress bar on the console
    deterministic: bool = neutral(False)  # train.py: deterministic algorithms only (slower; torch may refuse some)
    checkpoint_every_n_steps: int = neutral(200)  # train.py: OUT/checkpoints/last.ckpt this often (and at the end)

    def __post_init__(self) -> None:
        if self.checkpoint_every_n_steps < 1:
            raise ConfigError(f"trainer.checkpoint_every_n_steps={self.checkpoint_every_n_steps} must be >= 1")
        if self.devices == 0 or self.devices < -1:
            raise ConfigError(f"trainer.devices={self.devices} is not allowed: use a count >= 1, or -1 for all")
        if self.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes={self.num_nodes} must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases, used with logger=wandb."""

    project: str = "diffguard_pl"  # W&B project the run belongs to
    entity: Optional[str] = None  # W&B user or team; null: your default entity
    name: Optional[str] = None  # the run's display name; null: W&B picks one
    tags: List[str] = field(default_factory=list)  # labels to filter runs by, e.g. [fashion,smoke]
    offline: bool = True  # true: written under OUT/wandb/ without an account (`wandb sync` uploads later)


@dataclass
class RunConfig:
    """What every entry point shares: where outputs go, the seed, data, trainer and logger."""

    output_dir: str = neutral("outputs/run")  # where every output of the run goes (made if missing)
    seed: int = 0  # Lightning's global seed (per-sample randomness is seeded by sample id)
    logger: str = neutral("csv")  # csv (OUT/logs/metrics.csv) | wandb (offline unless wandb.offline=false)
    verbose: bool = neutral(False)  # show Lightning's start-up lines, model summary, tips and warnings
    print_config: bool = neutral(False)  # print the resolved config as YAML and stop (nothing is written)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = neutral(factory=WandbConfig)

    def __post_init__(self) -> None:
        _check_choice("logger", self.logger, ["csv", "wandb"])


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
        _check_choice("cotrain.clean", self.clean, ["x0_pred", "blend"])
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
        _check_positive("contrastive.temperature", self.temperature)
        _check_positive("contrastive.projection_dim", self.projection_dim)
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
        _check_choice("task", self.task, ["classifier", "diffusion", "cotrain", "joint", "contrastive"])
        _check_choice("monitor_mode", self.monitor_mode, ["min", "max"])


@dataclass
class CutoutConfig:
    """Random square crops of the clean estimate that amplify the guidance gradient.

    mode bilinear: continuous sides and positions, resized bilinearly. mode released: the released code's
    whole-pixel crops (sides from round(min_frac * S) to round(max_frac * S) - 1 of an S-pixel image: 224..255
    of 256), resized by nearest neighbour.
    """

    num: int = 8  # K crops per sample and step; 0 switches cutout off
    min_frac: float = 0.875  # smallest crop side as a fraction of the image side, in (0, max_frac] (released:
                             # 224 of 256 pixels)
    max_frac: float = 1.0  # largest crop side as a fraction of the image side, in [min_frac, 1]
    mode: str = "bilinear"  # bilinear (continuous sides and positions, bilinear resize) | released (the released
                            # code's whole-pixel crops, nearest-neighbour resize)

    def __post_init__(self) -> None:
        if self.num < 0:
            raise ConfigError(f"diffguard.guidance.cutout.num={self.num} must be >= 0")
        if not 0.0 < self.min_frac <= self.max_frac <= 1.0:
            raise ConfigError("diffguard.guidance.cutout needs 0 < min_frac <= max_frac <= 1")
        _check_choice("diffguard.guidance.cutout.mode", self.mode, ["bilinear", "released"])


@dataclass
class ClassifierFreeConfig:
    """Classifier-free guidance with distinct semantic guidance (DSG), the paper's LDM path.

    eps = eps_u + omega * (eps_c - eps_u) inside the DSG mask, eps_u outside.
    The mask: Grad-CAM of the classifier for the label (ReLU, resized to the
    image, min-max normalised per image) above ``cam_threshold``, resized
    (nearest) to the denoiser's resolution and fixed over all steps. With
    ``dsg: false`` the mask covers the whole image.
    """

    omega: float = 10.0  # guidance strength >= 0: eps_u + omega (eps_c - eps_u) inside the mask (released LDM: 10)
    dsg: bool = True  # guide only where the classifier's Grad-CAM is high (DSG); false: the whole image
    cam_layer: Optional[str] = None  # a module name in the timm model (e.g. layer4); null: its last feature stage
    cam_threshold: float = 0.3  # pixels whose normalised Grad-CAM (in [0, 1]) is above this are guided; in
                                # [0, 1) (released: 0.3)

    def __post_init__(self) -> None:
        _check_positive("diffguard.guidance.classifier_free.omega", self.omega, allow_zero=True)
        if not 0.0 <= self.cam_threshold < 1.0:
            raise ConfigError(f"diffguard.guidance.classifier_free.cam_threshold={self.cam_threshold} "
                              "must lie in [0, 1)")


@dataclass
class GuidanceConfig:
    """How synthesis follows the label.

    mode classifier (the paper's GDM path): eps_hat = eps - scale * sqrt(1 - a_t) * grad log p(y | x_clean),
    with clean grad and cutout; a class-conditional denoiser also receives the label.
    mode classifier_free (the paper's LDM path): classifier-free guidance of a class-conditional
    denoiser with a null class, optionally restricted by DSG (see :class:`ClassifierFreeConfig`).
    """

    mode: str = "classifier"  # classifier (the paper's GDM path) | classifier_free (its LDM path: a conditional
                              # denoiser with a null class, see diffguard.guidance.classifier_free)
    scale: float = 3.0  # classifier mode: guidance strength >= 0 (eps_hat = eps - scale sqrt(1 - alpha_bar_t)
                        # grad log p(y | x_clean))
    clean: str = "blend"  # what the classifier sees: x0_pred | blend (f x0_pred + (1-f) x_t with
                          # f = sqrt(1 - alpha_bar_t), the released code) | noisy (x_t)
    cutout: CutoutConfig = field(default_factory=CutoutConfig)
    classifier_free: ClassifierFreeConfig = field(default_factory=ClassifierFreeConfig)

    def __post_init__(self) -> None:
        _check_choice("diffguard.guidance.mode", self.mode, ["classifier", "classifier_free"])
        _check_positive("diffguard.guidance.scale", self.scale, allow_zero=True)
        _check_choice("diffguard.guidance.clean", self.clean, ["x0_pred", "blend", "noisy"])


@dataclass
class AESConfig:
    """Adaptive early stop: a sample stops inverting once its latent drifts far enough from x0.

    After each inversion step, the latent x_t (mapped to [0, 1] as (x + 1) / 2,
    not clipped, as the released code feeds it) is compared with x0: PSNR in dB
    with peak 1, SSIM (on the clamped images), and 1 - DISTS when its weights
    exist locally, at ``dists_size`` pixels. A threshold left null is not
    used. ``mode`` any: stop when any used metric falls below its threshold;
    all: when all do. The released thresholds, PSNR < 48.5 with peak 255 on
    [-1, 1] tensors and 1 - DISTS < 0.38, are psnr = 48.5 - 42.11 = 6.39 here
    (10 log10(255^2 / 4) = 42.11 dB) and dists = 0.38.
    """

    enabled: bool = False  # stop each sample's inversion early; needs at least one of psnr, ssim, dists
    psnr: Optional[float] = None  # dB (peak 1 on [0, 1]): a sample stops once the PSNR of its latent against x0
                                  # falls BELOW this (released 48.5 at peak 255 on [-1, 1] = 6.39 here); null: unused
    ssim: Optional[float] = None  # SSIM in [0, 1]: a sample stops once the SSIM of its latent against x0 falls
                                  # BELOW this; null: unused
    dists: Optional[float] = None  # 1 - DISTS in [0, 1] (needs local DISTS weights): a sample stops once it falls
                                   # BELOW this (released: 0.38); null: unused
    mode: str = "any"  # any: stop when any threshold in use is crossed | all: only when all of them are
    min_depth: int = 1  # never stop before this many inversion steps (the maximum is diffguard.depth)
    record_curves: bool = True  # record per-step PSNR / SSIM curves even when AES is off
    dists_size: Optional[int] = None  # side in pixels DISTS sees (resized); null: diffguard.perceptual_size

    def __post_init__(self) -> None:
        _check_choice("diffguard.aes.mode", self.mode, ["any", "all"])
        if self.enabled and self.psnr is None and self.ssim is None and self.dists is None:
            raise ConfigError("diffguard.aes.enabled=true needs at least one of aes.psnr, aes.ssim, aes.dists")
        if self.min_depth < 1:
            raise ConfigError(f"diffguard.aes.min_depth={self.min_depth} must be at least 1")


@dataclass
class RuntimeConfig:
    """How the pipeline executes on its device: speed settings, not the method (benchmarks/perf/throughput.py).

    ``autocast`` none | bf16 | fp16: the denoiser, the autoencoder and the classifier's forward passes (label,
    guidance, classifier distances) run under ``torch.autocast`` on the pipeline's device type; the DDIM updates,
    the guidance arithmetic, Grad-CAM / the DSG masks and the distances stay in float32. It changes scores
    slightly, so it is part of the results' fingerprint. ``channels_last``: the models' 4-D weights and inputs
    in channels-last memory format (faster convolutions on GPUs). ``compile``: ``torch.compile`` of the denoiser
    (the first batches pay the compilation). ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` while the
    pipeline runs on CUDA. ``inference_mode``: denoiser calls, inversion and scoring under
    ``torch.inference_mode`` (classifier guidance and Grad-CAM leave it for their gradients); false: ``no_grad``.
    """

    autocast: str = "none"  # none | bf16 | fp16: the models' forward passes under torch.autocast (DDIM updates,
                            # guidance arithmetic and distances stay float32); changes scores slightly
    channels_last: bool = False  # 4-D weights and inputs in channels-last memory format (faster on GPUs)
    compile: bool = False  # torch.compile the denoiser (the first batches pay for the compilation)
    cudnn_benchmark: bool = True  # torch.backends.cudnn.benchmark while the pipeline runs (CUDA only)
    inference_mode: bool = True  # denoiser calls, inversion and scoring under torch.inference_mode (guidance and
                                 # Grad-CAM still get their gradients); false: torch.no_grad

    def __post_init__(self) -> None:
        _check_choice("diffguard.runtime.autocast", self.autocast, ["none", "bf16", "fp16"])


DISTANCES = ["l1", "l2", "psnr", "ssim", "logit_l1", "feature_cos", "contrastive", "dists", "lpips"]


CLIP_X0 = ["none", "synthesis", "both"]


@dataclass
class DiffGuardConfig:
    """Inversion, guided synthesis and scoring.

    ``depth`` counts inversion steps (denoiser evaluations of the inversion). The ``ladder`` decides which
    levels they walk (diffguard_pl/method/ddim.py): ``symmetric`` (default) reaches the spaced timestep t_{depth-1}
    and synthesis takes ``depth`` steps back; ``released`` (guided-diffusion's ``ddim_reverse_sample``, as the
    released code) reaches t_depth (100 steps, depth 90: t = 900) and synthesis takes depth + 1 steps.
    ``handoff`` exact starts synthesis at the level the inversion reached; ``released`` one level above it
    (the released code's off-by-one, for exact reproduction only). ``clip_x0``: guided-diffusion's
    ``clip_denoised`` in its order: x0 predicted, clipped to [-1, 1], eps re-derived from it, then classifier
    guidance added to that eps (its gradient taken on the unclipped clean estimate); ``both`` also clips every
    inversion step after the first.
    """

    num_steps: int = 50  # spaced DDIM steps over the diffusion model's training schedule (released GDM: 100)
    depth: int = 25  # inversion steps (denoiser evaluations), at most num_steps (released GDM: 90); deeper: the
                     # latent is noisier and more of the image is synthesised anew
    ladder: str = "symmetric"  # symmetric (the inversion reaches spaced timestep t_{depth-1}, synthesis takes
                               # depth steps) | released (guided-diffusion's ddim_reverse_sample: reaches t_depth,
                               # synthesis takes depth + 1 steps)
    handoff: str = "exact"  # exact (synthesis starts where the inversion ended) | released (one level above it:
                            # the released code's off-by-one, for exact reproduction only)
    timestep_offset: int = 0  # spaced timesteps are k * stride + offset, in training timesteps (latent-diffusion's
                              # DDIM: 1)
    reference: str = "input"  # compare the synthesis with: input | unguided (reconstruction from the same latent)
    score: str = "l2"  # the distance reported as detector `diffguard`; one of distances
    distances: List[str] = field(default_factory=lambda: ["l1", "l2", "psnr", "ssim", "logit_l1", "feature_cos"])
        # computed between the synthesis and the reference, each also a detector diffguard/NAME: l1 | l2 (mean
        # absolute / squared pixel difference on [0, 1]) | psnr (minus the PSNR in dB) | ssim (1 - SSIM) | logit_l1 |
        # feature_cos (the classifier's logits / features) | contrastive (needs models.encoder) | dists | lpips
        # (need their weights locally)
    perceptual_size: Optional[int] = 64  # side in pixels images are resized to for DISTS / LPIPS; null: as they are
    seed: int = 0  # combined with each sample's id for cutout randomness
    clip_x0: str = "none"  # none | synthesis (clip the clean estimate to [-1, 1] in synthesis: x0 clipped, eps
                           # re-derived, then guidance added, as guided-diffusion's clip_denoised) | both (also
                           # every inversion step after the first)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    aes: AESConfig = field(default_factory=AESConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # speed settings (autocast, compile, ...)

    def __post_init__(self) -> None:
        _check_choice("diffguard.ladder", self.ladder, ["symmetric", "released"])
        _check_choice("diffguard.handoff", self.handoff, ["exact", "released"])
        _check_choice("diffguard.clip_x0", self.clip_x0, CLIP_X0)
        # Levels: num_steps spaced timesteps above the clean level; the released ladder treats the input as
        # the first of them, the released handoff starts synthesis one level higher.
        most = self.num_steps - (self.ladder == "released") - (self.handoff == "released")
        if not 1 <= self.depth <= most:
            raise ConfigError(f"diffguard.depth={self.depth} must lie in [1, {most}] with diffguard.num_steps="
                              f"{self.num_steps}, ladder={self.ladder}, handoff={self.handoff}")
        if self.timestep_offset < 0:
            raise ConfigError(f"diffguard.timestep_offset={self.timestep_offset} must be >= 0")
        _check_choice("diffguard.reference", self.reference, ["input", "unguided"])
        for name in self.distances:
            _check_choice("diffguard.distances", name, DISTANCES)
        if self.aes.min_depth > self.depth:
            raise ConfigError(f"diffguard.aes.min_depth={self.aes.min_depth} exceeds diffguard.depth={self.depth}")
        if self.score not in self.distances:
            raise ConfigError(f"diffguard.score={self.score!r} must be one of diffguard.distances {list(self.distances)}")
        for key, value in (("perceptual_size", self.perceptual_size), ("aes.dists_size", self.aes.dists_size)):
            if value is not None and value < 8:
                raise ConfigError(f"diffguard.{key}={value} is too small for VGG features; use 32 or more, or null")


@dataclass
class ModelPaths:
    """Where the models are.

    ``classifier``: a portable folder (classifier.json + model.safetensors), or a weights file (timm,
    torchvision or OpenOOD state dict, .pth / .ckpt / .safetensors), which then needs ``classifier_arch``
    and takes the ``classifier_*`` keys below (number of classes: the benchmark's).
    ``diffusion``: a diffusers folder (pixel or latent, UNet or DiT), or a Hugging Face Hub id
    (e.g. google/ddpm-cifar10-32) already in the local cache (nothing is downloaded).
    """

    classifier: str = str(EMBEDDED / "digits" / "classifier")  # a portable folder (classifier.json +
                                                               # model.safetensors) or a weights file (needs
                                                               # models.classifier_arch)
    diffusion: str = str(EMBEDDED / "digits" / "diffusion_uncond")  # a diffusers folder, or a Hugging Face Hub id
                                                                    # already in the local cache
    classifier_arch: Optional[str] = None  # a weights file's timm name, e.g. resnet50 (torchvision layout),
                                           # openood_resnet18_32x32; null for a portable folder
    classifier_input_size: Optional[int] = None  # side in pixels the classifier sees; null: data.resolution
    classifier_mean: Optional[List[float]] = None  # normalisation mean per channel; null: 0.5 per channel
    classifier_std: Optional[List[float]] = None  # normalisation standard deviation per channel; null: 0.5 each
    classifier_view: str = "resize"  # resize | center_crop: how a larger image reaches classifier_input_size
    encoder: Optional[str] = None  # the contrastive encoder folder (train.py task=contrastive) of distance contrastive
    diffusion_num_classes: Optional[int] = None  # classes of a conditional model; null: what the checkpoint says
    diffusion_null_class: Optional[int] = None  # the null (unconditional) class id; null: what the checkpoint says


@dataclass
class BaselineConfig:
    """The classifier detectors: which run beside DiffGuard, and how their hyperparameters are set.

    Names, what each needs and its grid: docs/detectors.md (the table of diffguard_pl/detectors/registry.py). Each
    is fitted on InD training images; a hyperparameter not given in ``params`` is chosen on validation splits like
    OpenOOD v1.5 (the grid value with the best AUROC of InD validation against the pooled OOD validation splits,
    never test splits; ties to the smaller value); without OOD validation data the registry's defaults are used. A
    detector that cannot run on the classifier is left out with its reason. The choices, every candidate's
    validation AUROC and each detector's cost are written to results.json under "baselines".
    """

    detectors: List[str] = field(default_factory=registry.default_names)  # classifier detectors to run, each a
                                                                          # column of scores.csv; every name, what
                                                                          # it needs and costs: docs/detectors.md
    params: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # fixed hyperparameters, not tuned: e.g.
                                                                     # baselines.params.knn.k=10
    grids: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # grids replacing the registry's: e.g.
                                                                    # baselines.grids.knn.k=[10,50]
    train_samples: Optional[int] = None  # fit the detectors on this many InD train images (chosen by id hash);
                                         # null: all

    def __post_init__(self) -> None:
        try:
            registry.check_names("baselines.detectors", self.detectors)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for key in ("params", "grids"):
            for name, values in getattr(self, key).items():
                if name not in self.detectors:
                    raise ConfigError(f"baselines.{key} has {name!r}, which baselines.detectors does not run: add it "
                                      f"there, or drop baselines.{key}.{name}")
                known = registry.hyperparameters(name)
                for param, value in values.items():
                    if param not in known:
                        raise ConfigError(f"baselines.{key}.{name}.{param}: {name} has "
                                          f"{'the hyperparameters ' + ', '.join(known) if known else 'none'}")
                    if key == "grids" and (not isinstance(value, (list, tuple)) or not value):
                        raise ConfigError(f"baselines.grids.{name}.{param}={value} must be a non-empty list")
        _check_positive("baselines.train_samples", self.train_samples, allow_none=True)


@dataclass
class EvalCallbacksConfig:
    """Plots and tables evaluate.py draws (they never change a score)."""

    curves: bool = True  # per-step inversion quality curves per set (CSV, PNG, W&B line plots)
    reconstructions: int = 8  # samples per set drawn as input / synthesis / reference / difference; 0 = off
    reconstruction_select: str = "first"  # first (by id) | extremes (half lowest, half highest DiffGuard score)
    score_plots: bool = True  # score histograms per detector, InD against each OOD set

    def __post_init__(self) -> None:
        _check_choice("callbacks.reconstruction_select", self.reconstruction_select, ["first", "extremes"])


@dataclass
class EvalConfig(RunConfig):
    """Root schema of ``evaluate.py``: DiffGuard and the classifier baselines on a benchmark."""

    output_dir: str = neutral("outputs/eval")  # results.json, scores.csv, records/ (resume), plots
    oracle: str = "none"  # also synthesise under oracle labels: none | ind (InD samples under their true label) |
                          # paper (also a random label for every OOD sample, the released oracle_label) | both
    limit_per_set: Optional[int] = neutral(None)  # evaluate N samples of each set, chosen by id hash (quick runs);
                                                  # null: every sample
    split: str = neutral("test")  # test (report on test splits) | val (on validation splits: for tuning, never test)
    resume: bool = neutral(True)  # skip samples already finished in output_dir/records by a run with the same config
    shard: Optional[str] = neutral(None)  # "i/n": only samples whose index modulo n is i (merge: diffguard_pl.jobs.merge)
    dry_run: bool = neutral(False)  # check every file and model, print the plan (sets, counts, steps) and stop
    score_folder: Optional[str] = None  # score the images of a folder (no labels): scores + in / out decisions as CSV
    score_folder_limit: Optional[int] = neutral(None)  # score_folder: score this many of its images (chosen by id
                                                       # hash); null: every image of the folder
    fusion_partners: List[str] = field(default_factory=lambda: list(registry.FUSION_DEFAULT))  # classifier
        # detectors X fused with DiffGuard as diffguard+X (z-scores summed, normalised on InD validation); each must
        # be in baselines.detectors
    models: ModelPaths = field(default_factory=ModelPaths)
    diffguard: DiffGuardConfig = field(default_factory=DiffGuardConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    callbacks: EvalCallbacksConfig = neutral(factory=EvalCallbacksConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("split", self.split, ["test", "val"])
        _check_choice("oracle", self.oracle, ["none", "ind", "paper", "both"])
        _check_positive("limit_per_set", self.limit_per_set, allow_none=True)
        _check_positive("score_folder_limit", self.score_folder_limit, allow_none=True)
        try:
            registry.check_names("fusion_partners", self.fusion_partners)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        missing = [p for p in self.fusion_partners if p not in self.baselines.detectors]
        if missing:
            raise ConfigError(f"fusion_partners has {', '.join(missing)}, which baselines.detectors does not run: add "
                              f"each there, or drop it from fusion_partners")
        parse_shard(self.shard)


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    return f"config key '{key}': {message}" if key else message


# Keys that hold an input path. They are made absolute when the config is composed: a relative value in a YAML
# file is relative to the file's project (the folder that holds its conf/ folder), so presets work from any
# working directory; on the command line, to the working directory. A saved config.yaml is then self-contained.
PATH_KEYS = ("models.classifier", "models.diffusion", "models.encoder", "cotrain.diffusion_path",
             "classifier.pretrained_path")
HUB_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"


def project_root(config_file: Path) -> Path:
    """The folder a config file's relative input paths refer to: the parent of its ``conf/`` folder."""
    folder = config_file.resolve().parent
    return folder.parent if folder.name == "conf" else folder


def resolve_paths(tree: DictConfig, base: Path) -> None:
    """Make the relative input paths (PATH_KEYS) of a loaded YAML file absolute against ``base``, in place.

    A value that looks like a Hugging Face Hub id (``org/name``) and is not a folder under ``base`` stays as it
    is (it is then looked up in the local Hub cache)."""
    import re

    for key in PATH_KEYS:
        value = OmegaConf.select(tree, key, default=None)
        if not isinstance(value, str) or Path(value).is_absolute():
            continue
        candidate = base / value
        if re.match(HUB_ID, value) and not candidate.exists() and key == "models.diffusion":
            continue
        OmegaConf.update(tree, key, str(candidate), merge=False)


def find_config_file(name: str | Path) -> Path:
    """A config file as given, else the project's preset of that name: ``fashion_gdm``, ``fashion_gdm.yaml`` and
    ``conf/fashion_gdm.yaml`` all name conf/fashion_gdm.yaml from any working directory. ConfigError otherwise,
    suggesting the closest preset names."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    preset = PRESETS / f"{stem}.yaml"
    if path.parent in (Path("."), Path("conf")) and preset.is_file():
        return preset
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"the presets are {', '.join(names)}"
    raise ConfigError(f"config file {name} does not exist and names no preset in {PRESETS}: {hint} "
                      f"(--config takes a YAML path or a preset's name)")


def merge(schema: Type[T], config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """YAML files then ``key=value`` overrides merged onto the schema's defaults; required keys may stay unset."""
    cfg = OmegaConf.structured(schema)
    for name in config_files:
        path = find_config_file(name)
        try:
            loaded = OmegaConf.load(path)
            resolve_paths(loaded, project_root(path))
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{path}: {_describe(error)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            given = OmegaConf.from_dotlist([item])
            resolve_paths(given, Path.cwd())
            cfg = OmegaConf.merge(cfg, given)
        except OmegaConfBaseException as error:
            raise ConfigError(f"override {item!r}: {_describe(error)}") from None
    return cfg


def compose(schema: Type[T], config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files then ``key=value`` overrides onto the schema's defaults; every required key must be set."""
    cfg = merge(schema, config_files, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key(s) {', '.join(missing)} must be set (e.g. {missing[0]}=...)")
    return cfg


def to_object(cfg: DictConfig) -> Any:
    """Instantiate the dataclasses, which runs their value checks."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None


def parse_argv(argv: Sequence[str], default_config: Optional[str]) -> Tuple[List[str], List[str]]:
    """``[--config FILE]... [key=value]...`` -> (config files, overrides); without --config: the default file."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(list(argv))
    files = args.config if args.config is not None else ([default_config] if default_config else [])
    return files, list(args.overrides)


def load(schema: Type[T], argv: Sequence[str], default_config: Optional[str]) -> T:
    """Parse ``[--config FILE]... [key=value]...`` into a checked schema instance."""
    return to_object(compose(schema, *parse_argv(argv, default_config)))


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
