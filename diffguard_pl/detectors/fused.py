"""The detectors derived from the recorded scores: ``diffguard`` (the configured distance), ``ddpm_ood`` (from its
recorded errors) and the fusions.

Higher scores mean more OOD. The columns (declared in diffguard_pl/records/columns.py): ``diffguard`` copies
``diffguard/<diffguard.score>``; DDPM-OOD's score is its per-level errors z-scored on the InD validation records
(diffguard_pl/method/ddpm_ood.py); ``diffguard+<X>`` is DiffGuard fused with X (the sum of the z-scores, each
normalised on the InD validation split only; X in ``fusion_partners``: a detector, or several joined by ``+``,
whose fusion without DiffGuard, ``X``, is added too); DiffGuard's also under each oracle's labels
(``oracle-<mode>/...``, diffguard_pl/method/oracle.py). The report adds them once, from the records alone.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.registry import DDPM_OOD, FUSION_DEFAULT, is_classifier_detector
from diffguard_pl.records.columns import (DIFFGUARD, FUSED_SEPARATOR, SET, SPLIT, distance_column, fused_column,
                                          oracle_prefixes, stats_column, stats_of)


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


def with_ddpm_ood(records: Mapping[str, list]) -> Tuple[Dict[str, list], List[str]]:
    """``records`` with ``ddpm_ood`` added from its recorded per-level errors (``stats/ddpm_ood/<kind>``), z-scored
    per level and kind on the InD validation records only; notes on what was left out."""
    from diffguard_pl.method.ddpm_ood import DDPMOODScore

    kinds = [stats_of(c)[1] for c in records if stats_of(c) and stats_of(c)[0] == DDPM_OOD]
    if not kinds:
        return dict(records), []
    rows = [i for i, (sp, s) in enumerate(zip(records[SPLIT], records[SET])) if sp == "val" and s == IND]
    if len(rows) < 2:
        return dict(records), [f"{DDPM_OOD} left out: its z-scores need at least 2 InD validation samples, got "
                               f"{len(rows)}"]
    errors = {k: torch.tensor(records[stats_column(DDPM_OOD, k)], dtype=torch.float64) for k in kinds}
    head = DDPMOODScore().fit({k: v[rows] for k, v in errors.items()})
    return {**records, DDPM_OOD: head.score(errors).tolist()}, []


def with_derived_detectors(records: Mapping[str, list], score: str,
                           partners: Sequence[str] = FUSION_DEFAULT) -> Tuple[Dict[str, list], List[str]]:
    """``records`` with ``diffguard`` (the configured distance), ``ddpm_ood`` (from its errors), ``diffguard+X`` for
    each partner X and, for a partner of several detectors (``a+b``), their fusion ``a+b`` without DiffGuard
    (z-scores summed) added, and notes on what was left out; ``records`` itself is not changed.

    The z-score normalisation of every detector is fitted on the InD validation split only; oracle variants
    (``oracle-<mode>/...``) get the same normalisation. A partner with a detector without a column (left out: it
    cannot run on the classifier) and, with fewer than two InD validation samples (a small ``shard=i/n`` slice),
    every fused detector are left out; the notes say so.
    """
    records, notes = with_ddpm_ood(records)
    parts = {p: p.split(FUSED_SEPARATOR) for p in partners}
    missing = {p: [d for d in parts[p] if d not in records] for p in partners}
    notes += [f"{fused_column(p)} left out: {', '.join(m)} has no scores in this run (results.json "
              f"{'baselines.left_out ' if all(map(is_classifier_detector, m)) else ''}says why)"
              for p, m in missing.items() if m]
    partners = [p for p in partners if not missing[p]]
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
    for detector in {d for p in partners for d in parts[p]}:
        norm[detector] = zscore(select(records, "val", IND, detector))
    normalised = lambda column, detector: (torch.tensor(records[column], dtype=torch.float64)
                                           - norm[detector][0]) / norm[detector][1]
    for partner in partners:
        others = sum(normalised(d, d) for d in parts[partner])
        if len(parts[partner]) > 1:
            records[partner] = others.tolist()
        for prefix in prefixes:
            if f"{prefix}{DIFFGUARD}" in records:
                records[prefix + fused_column(partner)] = (normalised(f"{prefix}{DIFFGUARD}", DIFFGUARD)
                                                           + others).tolist()
    return records, notes
