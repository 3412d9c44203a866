"""The detectors derived from the recorded scores: ``diffguard`` (the configured distance) and ``diffguard+X``.

Higher scores mean more OOD. The columns (declared in diffguard_pl/records/columns.py): ``diffguard`` copies
``diffguard/<diffguard.score>``; ``diffguard+<X>`` is DiffGuard fused with detector X (the sum of both z-scores,
normalised on the InD validation split only; X in ``fusion_partners``); both also under each oracle's labels
(``oracle-<mode>/...``, diffguard_pl/method/oracle.py). The report adds them once, from the records alone.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.registry import FUSION_DEFAULT
from diffguard_pl.records.columns import DIFFGUARD, SET, SPLIT, distance_column, fused_column, oracle_prefixes


def zscore(values: torch.Tensor) -> Tuple[float, float]:
    """(mean, standard deviation) that normalise a detector's scores: fitted on InD validation scores only; a
    zero deviation counts as 1."""
    return float(values.mean()), float(values.std()) or 1.0


def fuse(diffguard: torch.Tensor, partner: torch.Tensor, norm_diffguard: Tuple[float, float],
         norm_partner: Tuple[float, float]) -> torch.Tensor:
    """``diffguard+X``: the sum of both z-scores."""
    (mu_d, sd_d), (mu_p, sd_p) = norm_diffguard, norm_partner
    return (diffguard - mu_d) / sd_d + (partner - mu_p) / sd_p


def select(records: Mapping[str, list], split: str, set_name: str, column: str) -> torch.Tensor:
    """The values of ``column`` for the samples of one set and split, as float64."""
    values = [v for v, sp, s in zip(records[column], records[SPLIT], records[SET]) if sp == split and s == set_name]
    return torch.tensor(values, dtype=torch.float64)


def with_derived_detectors(records: Mapping[str, list], score: str,
                           partners: Sequence[str] = FUSION_DEFAULT) -> Tuple[Dict[str, list], List[str]]:
    """``records`` with ``diffguard`` (the configured distance) and ``diffguard+X`` for each partner X (z-scores
    summed) added, and notes on what was left out; ``records`` itself is not changed.

    The z-score normalisation of every detector is fitted on the InD validation split only; oracle variants
    (``oracle-<mode>/...``) get the same normalisation. A partner without a column (left out: it cannot run on
    the classifier) and, with fewer than two InD validation samples (a small ``shard=i/n`` slice), every fused
    detector are left out; the notes say so.
    """
    records = dict(records)
    notes = [f"{fused_column(p)} left out: {p} has no scores in this run (results.json baselines.left_out says why)"
             for p in partners if p not in records]
    partners = [p for p in partners if p in records]
    prefixes = oracle_prefixes(records)
    for prefix in prefixes:
        source = prefix + distance_column(score)
        if source in records:
            records[f"{prefix}{DIFFGUARD}"] = list(records[source])
    val_dg = select(records, "val", IND, distance_column(score))
    if len(val_dg) < 2:
        return records, notes + [f"fused detectors left out: their normalisation needs at least 2 InD validation "
                                 f"samples, got {len(val_dg)}"]
    norm = {DIFFGUARD: zscore(val_dg)}
    for partner in partners:
        norm[partner] = zscore(select(records, "val", IND, partner))
    for prefix in prefixes:
        if f"{prefix}{DIFFGUARD}" not in records:
            continue
        for partner in partners:
            fused = fuse(torch.tensor(records[f"{prefix}{DIFFGUARD}"], dtype=torch.float64),
                         torch.tensor(records[partner], dtype=torch.float64), norm[DIFFGUARD], norm[partner])
            records[prefix + fused_column(partner)] = fused.tolist()
    return records, notes
