"""The value checks the schema's ``__post_init__`` methods run (and the ``shard`` parser ``evaluate.py`` shares).

Each raises :class:`ConfigError` naming the key and what is allowed, so a bad value stops a run before any work
starts with one line the user can act on.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from diffguard_pl.detectors import registry
from diffguard_pl.errors import ConfigError
from diffguard_pl.records.columns import FUSED_SEPARATOR


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    """A value that must be one of a fixed set (the error lists the set)."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(choices)}")


def check_positive(key: str, value: Optional[float], allow_none: bool = False, allow_zero: bool = False) -> None:
    """A count or scale that must be a finite number above zero (or at least zero)."""
    if value is None and allow_none:
        return
    bad = value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        kind = "a whole number" if isinstance(value, int) else "a finite number"
        rule = f"{kind} >= 0" if allow_zero else f"{kind} > 0"
        raise ConfigError(f"{key}={value} is not allowed: use {rule}")


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



def check_fusion_partners(partners: Sequence[str], classifier_detectors: Sequence[str],
                          diffusion_detectors: Sequence[str]) -> None:
    """Each fusion partner's detectors run in this evaluation (ConfigError naming the key that adds them)."""
    running = set(classifier_detectors) | set(diffusion_detectors)
    for partner in partners:
        parts = partner.split(FUSED_SEPARATOR)
        if len(set(parts)) < len(parts):
            raise ConfigError(f"fusion_partners has {partner!r}, which names a detector twice")
        for part in parts:
            if registry.is_diffusion_detector(part):
                if part not in running:
                    raise ConfigError(f"fusion_partners has {partner!r}, but diffusion_detectors.names does not "
                                      f"run {part}: add it there, or drop it from fusion_partners")
                continue
            try:
                registry.check_names("fusion_partners", [part])
            except ValueError as error:
                raise ConfigError(f"{error}, or a diffusion detector: "
                                  f"{', '.join(d.name for d in registry.DIFFUSION_DETECTORS)}") from None
            if part not in running:
                raise ConfigError(f"fusion_partners has {part}, which baselines.detectors does not run: add "
                                  f"it there, or drop it from fusion_partners")
