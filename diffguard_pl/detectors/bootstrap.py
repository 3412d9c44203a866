"""Bootstrap intervals of AUROC, over test samples: per set, per group mean, and paired differences.

A replicate resamples the InD samples and every OOD set, each with replacement, from a generator with a fixed
seed; the same seed and sample counts give the same resamples, so two detectors scored on the same samples
are compared on identical replicates (a paired bootstrap). Within a replicate all OOD sets share the InD
resample, as the group mean shares the InD scores. Intervals are percentile intervals (2.5% / 97.5%).

AUROC of a replicate: with the InD scores sorted, each OOD score counts the InD scores below it plus half of
those equal to it (``searchsorted`` left and right): P(s_ood > s_ind) + P(s_ood = s_ind) / 2, ties exact.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import torch

REPLICATES = 1000


def _draw(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, size, (n, size), generator=generator)


def replicate_aurocs(ind: torch.Tensor, oods: Mapping[str, torch.Tensor], n: int = REPLICATES,
                     seed: int = 0) -> Dict[str, torch.Tensor]:
    """Per OOD set, the AUROC of ``n`` bootstrap replicates (float64 [n]); see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    ind = ind.to(torch.float64)
    sorted_ind = ind[_draw(n, len(ind), g)].sort(dim=1).values  # [n, k]
    out = {}
    for name, ood in oods.items():  # draws in the given order: callers pass the sets in a fixed order
        resampled = ood.to(torch.float64)[_draw(n, len(ood), g)]  # [n, m]
        below = torch.searchsorted(sorted_ind, resampled, right=False)
        at_or_below = torch.searchsorted(sorted_ind, resampled, right=True)
        out[name] = (below + at_or_below).sum(dim=1).to(torch.float64) / (2.0 * len(ind) * len(ood))
    return out


def interval(replicates: torch.Tensor, level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of bootstrap replicates."""
    tail = (1 - level) / 2
    return float(replicates.quantile(tail)), float(replicates.quantile(1 - tail))


def group_mean(replicates: Mapping[str, torch.Tensor], members: Sequence[str]) -> torch.Tensor:
    """Per replicate, the mean AUROC over ``members`` (the near or far group)."""
    return torch.stack([replicates[m] for m in members]).mean(dim=0)


def paired_difference(ind_a: torch.Tensor, oods_a: Mapping[str, torch.Tensor], ind_b: torch.Tensor,
                      oods_b: Mapping[str, torch.Tensor], members: Sequence[str], n: int = REPLICATES,
                      seed: int = 0) -> Tuple[float, float, float]:
    """Mean AUROC over ``members`` of detector a minus that of detector b, scored on the same samples:
    (point estimate, 2.5%, 97.5%) over identical replicates."""
    from diffguard_pl.detectors.metrics import auroc

    a = group_mean(replicate_aurocs(ind_a, {m: oods_a[m] for m in members}, n, seed), members)
    b = group_mean(replicate_aurocs(ind_b, {m: oods_b[m] for m in members}, n, seed), members)
    point = sum(auroc(ind_a, oods_a[m]) - auroc(ind_b, oods_b[m]) for m in members) / len(members)
    lo, hi = interval(a - b)
    return point, lo, hi
