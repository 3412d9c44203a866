"""The schema every entry point shares: where a run's outputs go, its seed, data, trainer and logger (RunConfig).

``train.py`` (diffguard_pl/config_training.py) and ``evaluate.py`` (diffguard_pl/config_evaluation.py) extend
RunConfig, and build their fields with what is here too: the project's folders (PROJECT_ROOT, EMBEDDED) and
:func:`neutral`. A field's ``# comment``, with the deeper-indented comment lines below it, is its ``--help`` text
(diffguard_pl/cli.py reads it from this source).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING

from diffguard_pl.config_checks import check_choice, check_positive
from diffguard_pl.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the folder holding conf/ and checkpoints/
EMBEDDED = PROJECT_ROOT / "checkpoints"


def neutral(default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A field that never changes a sample's score: where and how a run executes and logs, and which bad files
    are dropped (the records of the samples present stay valid). Not fingerprinted, see
    diffguard_pl/records/store.py."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"neutral": True})
    return field(default=default, metadata={"neutral": True})


@dataclass
class DataConfig:
    """Which benchmark to build and how its images are preprocessed.

    benchmark digits: the embedded Digits-OOD benchmark (built from installed packages).
    benchmark cifar10 / imagenet: OpenOOD v1.5 image lists under ``root`` (the folder holding
    benchmark_imglist/, images_classic/, images_largescale/), see diffguard_pl/data/image_lists.py.
    benchmark lists: your own images under ``root``, as class folders or image lists, described by
    ``definition`` (a walk-through: docs/own_data.md; every shape: diffguard_pl/data/definition.py)::

        definition:
          ind: {folder: my_images}       # one sub-folder per class (its name: the class name), split into
                                         # train / val / test by image id (val_fraction, test_fraction)
          ood: {my_set: {group: far, folder: my_ood_images}}   # split into val / test (ood_val_fraction)

    or with the splits given: ``ind: {train: {folder: train}, val: {folder: val}, test: {list: test.txt,
    data_dir: images}}`` (val null: carved from train), ``ood: {my_set: {group: near, val: null, test: {...}}}``.
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
    definition: Optional[Dict[str, Any]] = None  # benchmark=lists only: {ind: SET or {train, val, test}, ood:
                                                 # {NAME: {group: near | far, and SET or val, test}}}, a SET a
                                                 # {folder: DIR} (InD: one sub-folder per class) or a {list: FILE,
                                                 # data_dir: DIR}; splits not given are carved by image id
                                                 # (docs/own_data.md); num_classes: N needed for lists
    preprocess: Optional[str] = None  # resize | resize_center_crop; null: the benchmark's standard one
    resize: Optional[int] = None  # resize_center_crop: shorter side in pixels before the crop; null: the standard ratio
    on_error: str = neutral("raise")  # raise (bad list lines / unreadable images stop the run) | skip (dropped,
                                      # named and counted; which samples exist, never a score: a run may resume
                                      # with the other value)
    allow_grayscale: bool = False  # convert grayscale images in an RGB benchmark (counted in results.json)
    verify_files: Optional[bool] = neutral(None)  # decode every image up front; null: only with on_error=skip
                                                  # (score_folder's images: always, before any model loads)
    decode_workers: int = neutral(4)  # threads that verify images up front
    ind_classes: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])  # digits / fashion: the source
                                                                                # labels that are InD (relabelled 0..)
    near_ood_classes: List[int] = field(default_factory=lambda: [6, 7, 8, 9])  # digits / fashion: the labels of
                                                                               # the near-OOD set
    val_fraction: float = 0.15  # share of the InD training images held out for validation (digits, fashion:
                                # stratified by class; lists without an InD val split: by image id)
    test_fraction: float = 0.25  # share of the InD images held out for testing: digits; lists whose InD images
                                 # are one set (fashion: the official test set)
    ood_samples_per_set: int = 300  # images per generated OOD set (digits: also caps digits_6to9), before the split
    ood_val_fraction: float = 0.2  # share of every OOD set drawn for its validation split (the rest is test;
                                   # lists: of each OOD set given as one set, by image id)
    batch_size: int = neutral(64)  # images per training batch
    eval_batch_size: int = neutral(64)  # images per evaluation batch (a GPU takes 256 or more)
    num_workers: int = neutral(0)  # DataLoader worker processes

    def __post_init__(self) -> None:
        check_choice("data.benchmark", self.benchmark, ["digits", "fashion", "cifar10", "imagenet", "lists"])
        check_choice("data.channels", self.channels, [1, 3])
        check_choice("data.on_error", self.on_error, ["raise", "skip"])
        if self.preprocess is not None:
            check_choice("data.preprocess", self.preprocess, ["resize", "resize_center_crop"])
        if self.benchmark not in ("digits", "fashion") and self.root is None:
            raise ConfigError(f"data.benchmark={self.benchmark} reads image files: set data.root=/path/to/data")
        if self.benchmark == "lists" and self.definition is None:
            raise ConfigError("data.benchmark=lists needs data.definition, e.g. {ind: {folder: my_images}, ood: "
                              "{my_set: {group: far, folder: my_ood}}}: see docs/own_data.md")
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
            check_positive(f"data.{key}", getattr(self, key))
        if self.num_workers < 0 or self.decode_workers < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.decode_workers >= 1")


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
    name: Optional[str] = None  # the run's display name; null: the preset and the keys the command line
                                # changes (fashion_gdm diffguard.depth=20), W&B's own pick outside the command line
    tags: List[str] = field(default_factory=list)  # labels to filter runs by, e.g. [fashion,smoke]; the run adds
                                                   # preset:, benchmark:, guidance: and split: (evaluate.py) or
                                                   # task: (train.py)
    group: Optional[str] = None  # runs shown together, e.g. a sweep's; null: the shards of one evaluation
                                 # (shard=i/n) share one, the run name without its shard item; other runs none
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
        check_choice("logger", self.logger, ["csv", "wandb"])

    def from_command_line(self, config_files: List[str], overrides: List[str]) -> "RunConfig":
        """What the command line decides beyond its keys (the entry points call it once the config is valid):
        ``config_files`` the ``--config`` files (the preset), ``overrides`` the ``key=value`` items as written.
        Returns the config a run uses; this base names the W&B run when ``wandb.name`` is null
        (:func:`run_name`) and adds ``preset:<name>`` to ``wandb.tags`` unless they name a preset already (a
        saved config.yaml given as ``--config`` keeps its run's name and preset)."""
        preset = preset_name(config_files)
        name = self.wandb.name if self.wandb.name is not None else run_name(preset, overrides)
        named = any(tag.startswith(PRESET_TAG) for tag in self.wandb.tags)
        tags = list(self.wandb.tags) if named else [*self.wandb.tags, f"{PRESET_TAG}{preset}"]
        return replace(self, wandb=replace(self.wandb, name=name, tags=tags))


PRESET_TAG = "preset:"
# Keys left out of a run's name: where and how it writes and logs, never what it computes.
UNNAMED_KEYS = ("output_dir", "logger", "verbose", "print_config", "trainer.enable_progress_bar")
NAME_LENGTH = 96  # characters of a generated run name; W&B shows about this much in its runs table
ITEM_LENGTH = 40  # characters of one key=value item in it


def preset_name(config_files: Sequence[str]) -> str:
    """The preset a run starts from: the stem of its last ``--config`` file (the entry point's default file when
    none is given); ``default`` without any file."""
    return Path(config_files[-1]).stem if config_files else "default"


def run_name(preset: str, overrides: Sequence[str], limit: int = NAME_LENGTH) -> str:
    """A W&B run name from the preset and the overrides as written, e.g. ``fashion_gdm diffguard.depth=20
    limit_per_set=50``. Left out: the keys of :data:`UNNAMED_KEYS` and ``wandb.*``. Shortened: a path value to
    ``.../<its last part>``, an item to :data:`ITEM_LENGTH` characters; items that do not fit in ``limit``
    characters are counted at the end (``+3 more``)."""
    items = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key in UNNAMED_KEYS or key.startswith("wandb."):
            continue
        if "/" in value.rstrip("/") and not re.fullmatch(r"\d+/\d+", value):  # a path, not a shard i/n
            value = ".../" + Path(value).name
        text = f"{key}={value}"
        items.append(text if len(text) <= ITEM_LENGTH else text[: ITEM_LENGTH - 3] + "...")
    name = preset
    for n, item in enumerate(items):
        rest = len(items) - n - 1
        more = f" +{rest} more" if rest else ""
        if len(name) + 1 + len(item) + len(more) > limit:
            return f"{name} +{len(items) - n} more"
        name += f" {item}"
    return name
