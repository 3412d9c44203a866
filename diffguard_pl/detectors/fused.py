"""Every detector's name, in one table, and the detectors derived from the recorded scores.

Higher scores mean more OOD. Columns of the per-sample records (``scores.csv``):

- ``diffguard/<distance>``: DiffGuard with each distance of ``diffguard.distances``;
  ``diffguard``: the configured one (``diffguard.score``); with ``diffguard.reference=unguided`` also
  ``diffguard/<distance>@input``: the same synthesis against the input (what ``reference=input`` scores);
- ``msp``, ``ebo``, ``maxlogit``, ``knn``, ``vim``: the classifier baselines (diffguard_pl/detectors/baselines.py);
- ``diffguard+<X>``: DiffGuard fused with baseline X, the sum of both z-scores, normalised on the InD
  validation split only (X in ``fusion_partners``);
- ``oracle-<mode>/<detector>``: the same under oracle labels (diffguard_pl/method/oracle.py).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch

from diffguard_pl.data.benchmark import IND

DIFFGUARD = "diffguard"
BASELINES = ("msp", "ebo", "maxlogit", "knn", "vim")
FUSION_PARTNERS = ("ebo", "vim", "knn")
FUSED = "diffguard+ebo"
ORACLE_PREFIX = "oracle-"  # oracle-<mode>/<detector>
META_COLUMNS = ("id", "set", "split", "label", "pred", "synthesis_pred", "reference_pred", "round_trip_psnr", "depth",
                "unet_evals")
AGAINST_INPUT = "@input"


def distance_column(distance: str, against_input: bool = False) -> str:
    """The column of DiffGuard with one distance (``against_input``: the synthesis against the input in a run
    whose reference is the unguided reconstruction)."""
    return f"{DIFFGUARD}/{distance}{AGAINST_INPUT if against_input else ''}"


def fused_column(partner: str) -> str:
    """The column of DiffGuard fused with a baseline."""
    return f"{DIFFGUARD}+{partner}"


def oracle_column(mode: str, detector: str) -> str:
    """The column of a detector's oracle variant."""
    return f"{ORACLE_PREFIX}{mode}/{detector}"


def is_detector(column: str) -> bool:
    return column not in META_COLUMNS and not column.startswith("curve/")


def detector_columns(records: Mapping[str, list]) -> List[str]:
    return [c for c in records if is_detector(c)]


def select(records: Mapping[str, list], split: str, set_name: str, column: str) -> torch.Tensor:
    """The values of ``column`` for the samples of one set and split, as float64."""
    values = [v for v, sp, s in zip(records[column], records["split"], records["set"]) if sp == split and s == set_name]
    return torch.tensor(values, dtype=torch.float64)


def add_derived_detectors(records: Dict[str, list], score: str,
                          partners: Sequence[str] = FUSION_PARTNERS) -> List[str]:
    """Add ``diffguard`` (the configured distance) and ``diffguard+X`` for each partner X (z-scores summed).

    The z-score normalisation of every detector is fitted on the InD validation split only; oracle variants
    (``oracle-<mode>/...``) get the same normalisation. With fewer than two InD validation samples (a small
    ``shard=i/n`` slice) the fused detectors cannot be fitted and are left out; the returned notes say so.
    """
    partners = [p for p in partners if p in records]  # e.g. records of a run without feature baselines
    prefixes = [""] + sorted({c.split("/")[0] + "/" for c in records if c.startswith(ORACLE_PREFIX)})
    for prefix in prefixes:
        source = prefix + distance_column(score)
        if source in records:
            records[f"{prefix}{DIFFGUARD}"] = list(records[source])
    val_dg = select(records, "val", IND, distance_column(score))
    if len(val_dg) < 2:
        return [f"fused detectors left out: their normalisation needs at least 2 InD validation samples, "
                f"got {len(val_dg)}"]
    norm = {DIFFGUARD: (float(val_dg.mean()), float(val_dg.std()) or 1.0)}
    for partner in partners:
        values = select(records, "val", IND, partner)
        norm[partner] = (float(values.mean()), float(values.std()) or 1.0)
    for prefix in prefixes:
        if f"{prefix}{DIFFGUARD}" not in records:
            continue
        for partner in partners:
            (mu_d, sd_d), (mu_p, sd_p) = norm[DIFFGUARD], norm[partner]
            records[prefix + fused_column(partner)] = [
                (d - mu_d) / sd_d + (p - mu_p) / sd_p for d, p in zip(records[f"{prefix}{DIFFGUARD}"], records[partner])
            ]
    return []

