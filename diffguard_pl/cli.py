"""Shared entry-point plumbing: parse the config, run, turn known user errors into one clear line."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence, Type

from diffguard_pl import config as config_lib
from diffguard_pl.config import ConfigError
from diffguard_pl.data.files import DataError
from diffguard_pl.models.classifier import MissingCheckpointError


def run(schema: Type, job: Callable[[Any], Any], argv: Sequence[str], default_config: str) -> int:
    try:
        cfg = config_lib.load(schema, argv, default_config)
        job(cfg)
    except (ConfigError, MissingCheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
