"""OOD detection metrics on raw detector scores.

Convention: a score is "higher = more OOD". In-distribution (InD) samples are
the negative class, out-of-distribution (OOD) samples the positive class.

Every metric depends only on the order of the scores (ties included), never on
their scale, so any strictly increasing transform of the scores leaves it
unchanged. Nothing is squashed through a sigmoid (which saturates for scores
far outside [0, 1]); all arithmetic is float64 on the inputs' device.

Two conventions are provided side by side. Ours (the DiffGuard paper's):
``fpr_at_tpr`` keeps InD as the class whose 95% must be accepted, ``aupr*``
are average precision. OpenOOD v1.5's (``openood/evaluators/metrics.py``,
``auc_and_fpr_recall``): ``fpr_at_tpr_openood`` takes OOD as the positive
class on sklearn's thinned ROC curve, ``aupr*_openood`` are trapezoid areas
under sklearn's precision-recall curve. They are reimplemented here in torch
(sklearn is only used by the tests to check them).
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
    tp, fp = _curve_counts(pos, neg)  # counts predicted positive at each distinct value, highest first
    precision = tp / (tp + fp)
    recall = tp / pos.numel()
    recall_gain = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_gain * precision).sum().item()


def _positive(area, positive: str, doc: str):
    """AUPR ``area(pos, neg)`` of InD (ranked by ``-score``) or OOD (ranked by ``score``) as the positive class."""

    def metric(ind_scores: Scores, ood_scores: Scores) -> float:
        ind = _check(ind_scores, "ind_scores")
        ood = _check(ood_scores, "ood_scores")
        return area(-ind, -ood) if positive == "ind" else area(ood, ind)

    metric.__doc__ = doc
    return metric


aupr_in = _positive(aupr, "ind", "AUPR (average precision) with InD as the positive class.")
aupr_out = _positive(aupr, "ood", "AUPR (average precision) with OOD as the positive class.")


def _curve_counts(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative (tps, fps) at every distinct score value taken as threshold, in decreasing order.

    ``tps_k = #{pos >= t_k}``, ``fps_k = #{neg >= t_k}`` with ``t_1 > t_2 > ...`` the distinct
    values of ``cat(pos, neg)``: sklearn's ``confusion_matrix_at_thresholds`` (float64 counts, exact).
    """
    scores = torch.cat([pos, neg])
    is_pos = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    n_pos_at = torch.zeros_like(values).index_add_(0, inverse, is_pos)
    n_neg_at = torch.zeros_like(values).index_add_(0, inverse, 1.0 - is_pos)
    return torch.cumsum(n_pos_at.flip(0), 0), torch.cumsum(n_neg_at.flip(0), 0)


def roc_points_openood(ind_scores: Scores, ood_scores: Scores,
                       drop_intermediate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fpr, tpr)`` of ``sklearn.metrics.roc_curve(is_ood, score)``, OOD positive, float64.

    Thresholds are the distinct scores in decreasing order with cumulative counts
    ``tps_k, fps_k`` (``_curve_counts``). With ``drop_intermediate`` (sklearn's default)
    and more than two thresholds, point ``k`` is kept only if it is an end point or
    ``fps_{k+1} - 2 fps_k + fps_{k-1} != 0`` or ``tps_{k+1} - 2 tps_k + tps_{k-1} != 0``
    (a corner). Then ``(0, 0)`` is prepended and ``fpr = fps / fps_last``,
    ``tpr = tps / tps_last``.
    """
    ind = _check(ind_scores, "ind_scores")
    ood = _check(ood_scores, "ood_scores")
    tps, fps = _curve_counts(ood, ind)
    if drop_intermediate and tps.numel() > 2:
        corner = (torch.diff(fps, n=2) != 0) | (torch.diff(tps, n=2) != 0)
        end = corner.new_ones(1)
        keep = torch.cat([end, corner, end])
        tps, fps = tps[keep], fps[keep]
    zero = tps.new_zeros(1)
    tps, fps = torch.cat([zero, tps]), torch.cat([zero, fps])
    return fps / fps[-1], tps / tps[-1]


def fpr_at_tpr_openood(ind_scores: Scores, ood_scores: Scores, tpr: float = 0.95,
                       drop_intermediate: bool = True) -> float:
    """OpenOOD v1.5's FPR@TPR: OOD is the positive class (detected when ``score >= t``).

    ``fpr_list, tpr_list = roc_curve(is_ood, score)`` (``roc_points_openood``, thinned by
    default like sklearn), then ``fpr_list[argmax(tpr_list >= tpr)]``: the fraction of InD
    samples flagged as OOD at the first curve point that detects at least ``tpr`` of the OOD
    samples. Without thinning this equals ``fpr_at_tpr(-ood, -ind, tpr)`` (the classic
    definition with the roles of the two sets swapped); thinning can only raise it, when the
    first such point lies inside a straight run of the curve (e.g. InD and OOD scores tied).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    fpr_curve, tpr_curve = roc_points_openood(ind_scores, ood_scores, drop_intermediate)
    first = int(torch.nonzero(tpr_curve >= tpr)[0, 0])  # exists: the last point has tpr 1
    return fpr_curve[first].item()


def aupr_openood(pos_scores: Scores, neg_scores: Scores) -> float:
    """Trapezoid area under ``sklearn.metrics.precision_recall_curve`` (as ``sklearn.metrics.auc`` takes it).

    Over the distinct scores in decreasing order (``_curve_counts``), ``P_k = tps_k / (tps_k + fps_k)``,
    ``R_k = tps_k / n_pos``; sklearn (>= 1.1, no ``drop_intermediate``) appends the point
    ``(R_0, P_0) = (0, 1)``, so ``area = sum_k (R_k - R_{k-1}) (P_k + P_{k-1}) / 2``. Points past
    full recall (which sklearn < 1.1 cut off) add vertical segments of zero area.
    """
    pos = _check(pos_scores, "pos_scores")
    neg = _check(neg_scores, "neg_scores")
    tps, fps = _curve_counts(pos, neg)
    one = tps.new_ones(1)
    precision = torch.cat([one, tps / (tps + fps)])
    recall = torch.cat([one - 1, tps / pos.numel()])
    return (torch.diff(recall) * (precision[1:] + precision[:-1]) / 2).sum().item()


aupr_in_openood = _positive(aupr_openood, "ind", "OpenOOD's AUPR-In: trapezoid PR area, InD positive, ranked by -score.")
aupr_out_openood = _positive(aupr_openood, "ood", "OpenOOD's AUPR-Out: trapezoid PR area, OOD positive, ranked by score.")


def ood_metrics(ind_scores: Scores, ood_scores: Scores) -> dict[str, float]:
    """Metrics of one detector (python floats in [0, 1]), both conventions under unambiguous names.

    ``auroc``; ``fpr95_classic`` (``fpr_at_tpr``: OOD accepted when 95% of InD is kept, the paper's);
    ``fpr95_openood`` (``fpr_at_tpr_openood``: InD flagged when 95% of OOD is detected, OpenOOD v1.5);
    ``aupr_in`` / ``aupr_out`` (average precision); ``aupr_in_openood`` / ``aupr_out_openood``
    (OpenOOD v1.5's trapezoid areas).
    """
    ind = _check(ind_scores, "ind_scores")
    ood = _check(ood_scores, "ood_scores")
    return {
        "auroc": auroc(ind, ood),
        "fpr95_classic": fpr_at_tpr(ind, ood, 0.95),
        "fpr95_openood": fpr_at_tpr_openood(ind, ood, 0.95),
        "aupr_in": aupr_in(ind, ood),
        "aupr_out": aupr_out(ind, ood),
        "aupr_in_openood": aupr_in_openood(ind, ood),
        "aupr_out_openood": aupr_out_openood(ind, ood),
    }
