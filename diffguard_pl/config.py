"""Typed configuration: every default lives in the dataclasses below.

YAML files in ``conf/`` and ``key=value`` command-line overrides only change
values that the schema already declares. An unknown key, a value of the wrong
type or a missing required value raises :class:`ConfigError` naming the key,
before any work starts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(choices)}")


@dataclass
class DataConfig:
    """Which benchmark to build and how its images are preprocessed."""

    benchmark: str = "digits"
    resolution: int = 16  # every set is resized to resolution x resolution
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    seed: int = 0  # fixes splits and the generated OOD sets
    ind_classes: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    near_ood_classes: List[int] = field(default_factory=lambda: [6, 7, 8, 9])
    val_fraction: float = 0.15  # of the InD images, stratified by class
    test_fraction: float = 0.25
    ood_samples_per_set: int = 300  # before the OOD val / test split
    ood_val_fraction: float = 0.2
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_choice("data.benchmark", self.benchmark, ["digits"])
        _check_choice("data.channels", self.channels, [1, 3])
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


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | constant, both after a linear warmup
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ["adamw", "sgd"])
        _check_choice("optim.scheduler", self.scheduler, ["cosine", "constant"])


@dataclass
class ClassifierConfig:
    """A timm classifier; ``arch`` is any name ``timm.create_model`` knows."""

    arch: str = "diffguard_resnet_tiny"
    pretrained_path: Optional[str] = None  # local weights (safetensors or torch state dict)
    mean: Optional[List[float]] = None  # default: 0.5 per channel
    std: Optional[List[float]] = None
    input_size: Optional[int] = None  # default: data.resolution
    drop_rate: float = 0.0
    label_smoothing: float = 0.0
    augment_shift: int = 1  # random translation in pixels during training
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    """A diffusers UNet2DModel trained as an epsilon-predicting DDPM."""

    conditional: bool = False  # class-conditional with a null class for CFG
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 2
    attention_levels: List[bool] = field(default_factory=lambda: [False, False, True])
    attention_head_dim: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    label_dropout: float = 0.1  # probability of replacing the label by the null class
    ema_decay: float = 0.999
    dropout: float = 0.0  # inside the UNet's residual blocks
    augment_shift: int = 0  # random translation in pixels of training images

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
    """Passed to ``lightning.Trainer``."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = -1
    max_epochs: Optional[int] = None
    log_every_n_steps: int = 20
    check_val_every_n_epoch: int = 1
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class WandbConfig:
    project: str = "diffguard_pl"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    offline: bool = True  # works without an account; `wandb sync` uploads later


@dataclass
class RunConfig:
    """What every entry point shares: where outputs go, the seed, data, trainer and logger."""

    output_dir: str = "outputs/run"
    seed: int = 0
    logger: str = "csv"  # csv | wandb
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _check_choice("logger", self.logger, ["csv", "wandb"])


@dataclass
class TrainConfig(RunConfig):
    """Root schema of ``train.py``."""

    task: str = MISSING  # classifier | diffusion
    output_dir: str = "outputs/train"
    resume: Optional[str] = None  # a Lightning checkpoint (e.g. OUTPUT/checkpoints/last.ckpt)
    monitor: Optional[str] = None  # e.g. val/loss: export the best checkpoint by this metric, not the last
    monitor_mode: str = "min"  # min | max
    optim: OptimConfig = field(default_factory=OptimConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("task", self.task, ["classifier", "diffusion"])
        _check_choice("monitor_mode", self.monitor_mode, ["min", "max"])


@dataclass
class CutoutConfig:
    """Random square crops of the clean estimate that amplify the guidance gradient."""

    num: int = 8  # K crops per sample and step; 0 switches cutout off
    min_frac: float = 0.875  # crop side as a fraction of the image side (released: 224..256 of 256)
    max_frac: float = 1.0

    def __post_init__(self) -> None:
        if self.num < 0:
            raise ConfigError(f"diffguard.guidance.cutout.num={self.num} must be >= 0")
        if not 0.0 < self.min_frac <= self.max_frac <= 1.0:
            raise ConfigError("diffguard.guidance.cutout needs 0 < min_frac <= max_frac <= 1")


@dataclass
class GuidanceConfig:
    """Classifier guidance: eps_hat = eps - scale * sqrt(1 - a_t) * grad log p(y | x_clean)."""

    scale: float = 3.0
    clean: str = "blend"  # what the classifier sees: x0_pred | blend (f x0_pred + (1-f) x_t) | noisy (x_t)
    cutout: CutoutConfig = field(default_factory=CutoutConfig)

    def __post_init__(self) -> None:
        _check_choice("diffguard.guidance.clean", self.clean, ["x0_pred", "blend", "noisy"])


@dataclass
class AESConfig:
    """Adaptive early stop: a sample stops inverting once its latent drifts far enough from x0.

    After each inversion step, the latent x_t (mapped to [0, 1] as (x + 1) / 2,
    not clipped) is compared with x0: PSNR in dB with peak 1, SSIM, and
    1 - DISTS when its weights exist locally. A threshold left null is not
    used. ``mode`` any: stop when any used metric falls below its threshold;
    all: when all do. The released thresholds, PSNR < 48.5 with peak 255 on
    [-1, 1] tensors and 1 - DISTS < 0.38, are psnr = 48.5 - 42.11 = 6.39 here
    (10 log10(255^2 / 4) = 42.11 dB) and dists = 0.38.
    """

    enabled: bool = False
    psnr: Optional[float] = None
    ssim: Optional[float] = None
    dists: Optional[float] = None
    mode: str = "any"
    min_depth: int = 1  # never stop before this many inversion steps (the maximum is diffguard.depth)
    record_curves: bool = True  # record per-step PSNR / SSIM curves even when AES is off

    def __post_init__(self) -> None:
        _check_choice("diffguard.aes.mode", self.mode, ["any", "all"])
        if self.enabled and self.psnr is None and self.ssim is None and self.dists is None:
            raise ConfigError("diffguard.aes.enabled=true needs at least one of aes.psnr, aes.ssim, aes.dists")
        if self.min_depth < 1:
            raise ConfigError(f"diffguard.aes.min_depth={self.min_depth} must be at least 1")


DISTANCES = ["l1", "l2", "psnr", "ssim", "logit_l1", "feature_cos", "dists", "lpips"]


@dataclass
class DiffGuardConfig:
    """Inversion, guided synthesis and scoring."""

    num_steps: int = 50  # spaced DDIM steps over the training schedule (released GDM: 100)
    depth: int = 25  # inversion steps taken; synthesis starts at that level (released GDM: 90)
    reference: str = "input"  # compare the synthesis with: input | unguided (reconstruction from the same latent)
    score: str = "l2"  # the distance reported as detector `diffguard`
    distances: List[str] = field(default_factory=lambda: ["l1", "l2", "psnr", "ssim", "logit_l1", "feature_cos"])
    perceptual_size: int = 64  # images are resized to this for DISTS / LPIPS
    seed: int = 0  # combined with each sample's id for cutout randomness
    clip_x0: bool = False  # clip predicted x0 to [-1, 1] in synthesis steps (guided-diffusion's clip_denoised)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    aes: AESConfig = field(default_factory=AESConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= self.num_steps:
            raise ConfigError(f"diffguard.depth={self.depth} must lie in [1, diffguard.num_steps={self.num_steps}]")
        _check_choice("diffguard.reference", self.reference, ["input", "unguided"])
        for name in self.distances:
            _check_choice("diffguard.distances", name, DISTANCES)
        if self.aes.min_depth > self.depth:
            raise ConfigError(f"diffguard.aes.min_depth={self.aes.min_depth} exceeds diffguard.depth={self.depth}")
        if self.score not in self.distances:
            raise ConfigError(f"diffguard.score={self.score!r} must be one of diffguard.distances {list(self.distances)}")


@dataclass
class ModelPaths:
    classifier: str = "checkpoints/digits/classifier"  # portable classifier folder
    diffusion: str = "checkpoints/digits/diffusion_uncond"  # diffusers folder


@dataclass
class BaselineConfig:
    knn_k: int = 10
    vim_dim: Optional[int] = None  # principal-space dimension; None: the module's rule


@dataclass
class EvalCallbacksConfig:
    curves: bool = True  # per-step inversion quality curves per set (CSV, PNG, W&B line plots)
    reconstructions: int = 8  # samples per set drawn as input / synthesis / reference / difference; 0 = off
    score_plots: bool = True  # score histograms per detector, InD against each OOD set


@dataclass
class EvalConfig(RunConfig):
    """Root schema of ``evaluate.py``."""

    output_dir: str = "outputs/eval"
    oracle: bool = False  # also evaluate with true labels for InD samples
    limit_per_set: Optional[int] = None  # evaluate only the first N samples of each set (quick runs)
    split: str = "test"  # test: report on test splits; val: on validation splits (for tuning, never test)
    resume: bool = True  # skip samples already finished in output_dir/shards by a run with the same config
    shard: Optional[str] = None  # "i/n": evaluate only samples whose index modulo n is i (merge with diffguard_pl.merge)
    models: ModelPaths = field(default_factory=ModelPaths)
    diffguard: DiffGuardConfig = field(default_factory=DiffGuardConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    callbacks: EvalCallbacksConfig = field(default_factory=EvalCallbacksConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("split", self.split, ["test", "val"])


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    return f"config key '{key}': {message}" if key else message


def compose(schema: Type[T], config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files then ``key=value`` overrides onto the schema's defaults."""
    cfg = OmegaConf.structured(schema)
    for path in config_files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (configs live in conf/)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as error:
            raise ConfigError(f"{path}: {_describe(error)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise ConfigError(f"override {item!r}: {_describe(error)}") from None
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


def load(schema: Type[T], argv: Sequence[str], default_config: Optional[str]) -> T:
    """Parse ``[--config FILE]... [key=value]...`` into a checked schema instance."""
    parser = argparse.ArgumentParser(description=schema.__doc__)
    parser.add_argument(
        "--config",
        action="append",
        default=None,
        help=f"YAML file(s) merged in order onto the schema defaults (default: {default_config})",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    args = parser.parse_args(list(argv))
    files = args.config if args.config is not None else ([default_config] if default_config else [])
    return to_object(compose(schema, files, args.overrides))


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
