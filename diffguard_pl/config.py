"""Typed configuration: every default lives in the schema's dataclasses.

YAML files in ``conf/`` and ``key=value`` command-line overrides only change
values that the schema already declares. An unknown key, a value of the wrong
type or a missing required value raises :class:`ConfigError` naming the key,
before any work starts.

The schema is split by entry point; a field's comment is its ``--help`` text:

- diffguard_pl/config_shared.py: what every run has (RunConfig: outputs, seed, data, trainer, logger);
- diffguard_pl/config_training.py: ``train.py``'s TrainConfig (optimiser, classifier, diffusion model, ...);
- diffguard_pl/config_evaluation.py: ``evaluate.py``'s EvalConfig (models, DiffGuard, baselines, plots);
- diffguard_pl/config_checks.py: the value checks their ``__post_init__`` methods run.

diffguard_pl/config_loading.py reads a config (files and overrides merged onto a schema, paths resolved) and
saves one. This module gathers the public names of all of them, so ``from diffguard_pl.config import EvalConfig,
load`` works wherever a name lives.
"""

from diffguard_pl.config_checks import check_choice, check_positive, parse_shard
from diffguard_pl.config_evaluation import (
    CLIP_X0,
    DISTANCES,
    AESConfig,
    BaselineConfig,
    ClassifierFreeConfig,
    CutoutConfig,
    DiffGuardConfig,
    EvalCallbacksConfig,
    EvalConfig,
    GuidanceConfig,
    ModelPaths,
    RuntimeConfig,
)
from diffguard_pl.config_loading import (
    HUB_ID,
    PATH_KEYS,
    PRESETS,
    compose,
    find_config_file,
    load,
    merge,
    parse_argv,
    project_root,
    resolve_paths,
    save,
    to_object,
)
from diffguard_pl.config_shared import (
    EMBEDDED,
    PROJECT_ROOT,
    DataConfig,
    RunConfig,
    TrainerConfig,
    WandbConfig,
    neutral,
)
from diffguard_pl.config_training import (
    ClassifierConfig,
    ContrastiveConfig,
    CoTrainConfig,
    DiffusionConfig,
    OptimConfig,
    TrainConfig,
)
from diffguard_pl.errors import ConfigError

__all__ = [
    # config_shared
    "PROJECT_ROOT", "EMBEDDED", "neutral", "DataConfig", "TrainerConfig", "WandbConfig", "RunConfig",
    # config_training
    "OptimConfig", "ClassifierConfig", "DiffusionConfig", "CoTrainConfig", "ContrastiveConfig", "TrainConfig",
    # config_evaluation
    "CutoutConfig", "ClassifierFreeConfig", "GuidanceConfig", "AESConfig", "RuntimeConfig", "DISTANCES", "CLIP_X0",
    "DiffGuardConfig", "ModelPaths", "BaselineConfig", "EvalCallbacksConfig", "EvalConfig",
    # config_checks
    "check_choice", "check_positive", "parse_shard",
    # config_loading
    "PRESETS", "PATH_KEYS", "HUB_ID", "project_root", "resolve_paths", "find_config_file", "merge", "compose",
    "to_object", "parse_argv", "load", "save",
    # diffguard_pl.errors: the error every check raises
    "ConfigError",
]
