"""OOD detection metrics on raw detector scores.

Convention: a score is "higher = more OOD". In-distribution (InD) samples are
the negative class, out-of-distribution (OOD) samples the positive class.

Every metric depends only on the order of the scores (ties included), never on
their scale, so any strictly increasing transform of the scores leaves it
unchanged. Nothing is squashed through a sigmoid (which saturates for scores
far outside [0, 1]); all arithmetic is float64 on the inputs' device.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

Scores = Union[torch.Tensor, Sequence[float]]


def _check(scores: Scores, name: str) -> torch.Tensor:
    """``scores`` as a 1-D float64 tensor; ValueError naming ``name`` if empty, not 1-D or non-finite."""
    x = torch.as_tensor(scores)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")
    x = x.to(torch.float64)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf) out of {x.numel()}")
    return x


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` in ascending order, tied values sharing their mean rank."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    first = torch.cumsum(counts, 0) - counts  # number of values below each distinct value
    return (first + (counts + 1) / 2)[inverse]


def auroc(ind_scores: Scores, ood_scores: Scores) -> float:
    """Area under the ROC curve, OOD as positive: P(s_ood > s_ind) + P(s_ood == s_ind) / 2.

    Exact (ties count 1/2) via the Mann-Whitney U statistic on average ranks, O(n log n).
    """
    ind = _check(ind_scores, "ind_scores")
    ood = _check(ood_scores, "ood_scores")
    n_ind, n_ood = ind.numel(), ood.numel()
    ranks = _average_ranks(torch.cat([ind, ood]))
    u = ranks[n_ind:].sum().item() - n_ood * (n_ood + 1) / 2
    return u / (n_ind * n_ood)


def fpr_at_tpr(ind_scores: Scores, ood_scores: Scores, tpr: float = 0.95) -> float:
    """FPR@TPR (the classic FPR@95 for ``tpr=0.95``), InD being the class to keep.

    A sample is *accepted* as InD when ``score <= threshold``. The threshold is
    the smallest InD score value ``v`` with ``mean(ind_scores <= v) >= tpr``,
    i.e. at least a fraction ``tpr`` of InD samples is accepted (with ties this
    can be more). Returns ``mean(ood_scores <= v)``: the fraction of OOD samples
    wrongly accepted. With sorted InD scores ``s_1 <= ... <= s_n``, ``v = s_i``
    for the smallest ``i`` with ``i / n >= tpr``.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    ind = _check(ind_scores, "ind_scores")
    ood = _check(ood_scores, "ood_scores")
    n = ind.numel()
    # The smallest i (1-based) with i / n >= tpr, checked with the same float
    # division as the definition so that e.g. 19 / 20 >= 0.95 holds.
    i = max(1, math.ceil(tpr * n) - 1)
    while i / n < tpr:
        i += 1
    threshold = torch.sort(ind).values[i - 1]
    return (ood <= threshold).to(torch.float64).mean().item()


def aupr(pos_scores: Scores, neg_scores: Scores) -> float:
    """Area under the precision-recall curve of the positive class (average precision).

    ``AP = sum_k (R_k - R_{k-1}) * P_k`` over the distinct score values taken
    as thresholds in decreasing order (predict positive when ``score >= t_k``),
    ``R_0 = 0``: the definition of ``sklearn.metrics.average_precision_score``,
    ties handled the same way (one threshold per distinct value).
    """
    pos = _check(pos_scores, "pos_scores")
    neg = _check(neg_scores, "neg_scores")
    scores = torch.cat([pos, neg])
    is_pos = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    # Per distinct value (ascending), how many positives / samples take it.
    n_pos_at = torch.zeros_like(values).index_add_(0, inverse, is_pos)
    n_all_at = torch.zeros_like(values).index_add_(0, inverse, torch.ones_like(scores))
    # Cumulate from the highest value down: counts predicted positive at each threshold.
    tp = torch.cumsum(n_pos_at.flip(0), 0)
    predicted = torch.cumsum(n_all_at.flip(0), 0)
    precision = tp / predicted
    recall = tp / pos.numel()
    recall_gain = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_gain * precision).sum().item()


def aupr_in(ind_scores: Scores, ood_scores: Scores) -> float:
    """AUPR with InD as the positive class (scores negated so that higher = more InD)."""
    ind = _check(ind_scores, "ind_scores")
    ood = _check(ood_scores, "ood_scores")
    return aupr(-ind, -ood)


def aupr_out(ind_scores: Scores, ood_scores: Scores) -> float:
    """AUPR with OOD as the positive class."""
    ind = _check(ind_scores, "ind_scores")
    ood = _check(ood_scores, "ood_scores")
    return aupr(ood, ind)


def ood_metrics(ind_scores: Scores, ood_scores: Scores) -> dict[str, float]:
    """AUROC, FPR@95, AUPR-In and AUPR-Out of one detector (python floats in [0, 1])."""
    ind = _check(ind_scores, "ind_scores")
    ood = _check(ood_scores, "ood_scores")
    return {
        "auroc": auroc(ind, ood),
        "fpr95": fpr_at_tpr(ind, ood, 0.95),
        "aupr_in": aupr_in(ind, ood),
        "aupr_out": aupr_out(ind, ood),
    }
