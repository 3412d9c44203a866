import math

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from diffguard_pl.detectors.metrics import (
    aupr,
    aupr_in,
    aupr_in_openood,
    aupr_openood,
    aupr_out,
    aupr_out_openood,
    auroc,
    fpr_at_tpr,
    fpr_at_tpr_openood,
    ood_metrics,
    roc_points_openood,
)


def brute_auroc(ind, ood) -> float:
    ind, ood = np.asarray(ind, dtype=np.float64), np.asarray(ood, dtype=np.float64)
    greater = (ood[:, None] > ind[None, :]).sum()
    equal = (ood[:, None] == ind[None, :]).sum()
    return (greater + 0.5 * equal) / (len(ind) * len(ood))


def brute_fpr(ind, ood, tpr=0.95) -> float:
    ind, ood = np.asarray(ind, dtype=np.float64), np.asarray(ood, dtype=np.float64)
    for v in np.unique(ind):  # ascending
        if np.mean(ind <= v) >= tpr:
            return float(np.mean(ood <= v))
    raise AssertionError("unreachable")


def tied_scores(seed: int, n_ind: int, n_ood: int, high: int = 8):
    g = torch.Generator().manual_seed(seed)
    ind = torch.randint(0, high, (n_ind,), generator=g).float()
    ood = torch.randint(2, high + 2, (n_ood,), generator=g).float()
    return ind, ood


def sk_labels(ind, ood):
    y = np.r_[np.zeros(len(ind)), np.ones(len(ood))]
    s = np.r_[np.asarray(ind, dtype=np.float64), np.asarray(ood, dtype=np.float64)]
    return y, s


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force_and_sklearn_with_ties(seed):
    ind, ood = tied_scores(seed, 137, 61)
    y, s = sk_labels(ind, ood)
    got = auroc(ind, ood)
    assert got == pytest.approx(brute_auroc(ind, ood), abs=1e-12)
    assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_aupr_matches_sklearn_with_ties(seed):
    ind, ood = tied_scores(seed, 90, 143, high=6)
    y, s = sk_labels(ind, ood)
    assert aupr_out(ind, ood) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert aupr_in(ind, ood) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert aupr(ood, ind) == aupr_out(ind, ood)


def test_aupr_matches_sklearn_continuous():
    g = torch.Generator().manual_seed(0)
    ind, ood = torch.randn(300, generator=g), torch.randn(200, generator=g) + 1.0
    y, s = sk_labels(ind, ood)
    assert auroc(ind, ood) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr_out(ind, ood) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert aupr_in(ind, ood) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)


def test_aupr_hand_computed():
    # Descending: 0.9(+), 0.8(-), 0.7(+) -> AP = 1/2 * 1 + 1/2 * 2/3.
    assert aupr(torch.tensor([0.9, 0.7]), torch.tensor([0.8])) == pytest.approx(0.5 + 1 / 3)
    # A tie of one positive and one negative at the top: one threshold, P = 1/2.
    assert aupr(torch.tensor([1.0, 0.0]), torch.tensor([1.0])) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_fpr_hand_computed():
    ind = torch.arange(1, 21, dtype=torch.float32)  # 1..20: 19/20 = 0.95 -> threshold 19
    ood = torch.tensor([5.0, 18.5, 19.0, 19.5, 30.0])  # accepted: 5, 18.5, 19
    assert fpr_at_tpr(ind, ood) == 0.6
    # Ties: fraction <= 2 is 0.8, so tpr 0.8 stops at 2 and tpr 0.95 goes on to 3.
    ind = torch.tensor([2.0, 1.0, 2.0, 3.0, 2.0])
    ood = torch.tensor([2.0, 2.5, 0.0])
    assert fpr_at_tpr(ind, ood, tpr=0.8) == pytest.approx(2 / 3)
    assert fpr_at_tpr(ind, ood, tpr=0.95) == 1.0
    assert fpr_at_tpr(ind, ood, tpr=0.2) == pytest.approx(1 / 3)  # threshold 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.5, 1.0])
def test_fpr_matches_brute_force(seed, tpr):
    ind, ood = tied_scores(seed, 20 + 7 * seed, 33, high=5 + seed)
    assert fpr_at_tpr(ind, ood, tpr) == pytest.approx(brute_fpr(ind, ood, tpr), abs=1e-15)


def test_fpr_continuous_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 19, 20, 21, 100, 101):
        ind, ood = torch.randn(n, generator=g), torch.randn(50, generator=g)
        assert fpr_at_tpr(ind, ood) == brute_fpr(ind, ood)


def test_perfect_and_reversed_separation():
    ind, ood = torch.linspace(0, 1, 50), torch.linspace(2, 3, 40)
    m = ood_metrics(ind, ood)
    assert m == {"auroc": 1.0, "fpr95_classic": 0.0, "fpr95_openood": 0.0, "aupr_in": 1.0, "aupr_out": 1.0,
                 "aupr_in_openood": 1.0, "aupr_out_openood": 1.0}
    m = ood_metrics(ood, ind)
    assert m["auroc"] == 0.0 and m["fpr95_classic"] == 1.0 and m["fpr95_openood"] == 1.0
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())


def test_constant_scores():
    m = ood_metrics(torch.zeros(10), torch.zeros(5))
    assert m["auroc"] == 0.5 and m["fpr95_classic"] == 1.0 and m["fpr95_openood"] == 1.0
    assert m["aupr_out"] == pytest.approx(5 / 15) and m["aupr_in"] == pytest.approx(10 / 15)
    # One threshold: the trapezoid from sklearn's start point (recall 0, precision 1) to (1, prevalence).
    assert m["aupr_out_openood"] == pytest.approx((1 + 5 / 15) / 2)
    assert m["aupr_in_openood"] == pytest.approx((1 + 10 / 15) / 2)


def test_invariant_to_monotone_transforms():
    ind, ood = tied_scores(11, 80, 70)
    ind, ood = ind / 4, ood / 4  # small values, exactly representable
    ref = ood_metrics(ind, ood)
    for f in (lambda x: x * 1000 + 5, torch.exp, lambda x: x.double() ** 3 - 7):
        assert ood_metrics(f(ind), f(ood)) == ref


def test_huge_scores_exact():
    # 1e6-scale scores differing by 1: a sigmoid would saturate all of them to 1.
    g = torch.Generator().manual_seed(5)
    ind_int = torch.randint(0, 40, (200,), generator=g)
    ood_int = torch.randint(20, 60, (150,), generator=g)
    expected = brute_auroc(ind_int.numpy(), ood_int.numpy())
    for dtype in (torch.float32, torch.float64):
        ind, ood = ind_int.to(dtype) + 1e6, ood_int.to(dtype) + 1e6
        assert auroc(ind, ood) == pytest.approx(expected, abs=1e-12)
        assert fpr_at_tpr(ind, ood) == brute_fpr(ind_int.numpy(), ood_int.numpy())
    assert 0.7 < expected < 0.95  # a non-trivial value


def test_dtypes_and_inputs():
    ind, ood = tied_scores(2, 30, 30)
    ref = ood_metrics(ind, ood)
    assert ood_metrics(ind.half(), ood.half()) == ref
    assert ood_metrics(ind.long(), ood.long()) == ref
    assert ood_metrics(ind.tolist(), ood.numpy()) == ref


@pytest.mark.parametrize("fn", [auroc, fpr_at_tpr, aupr_in, aupr_out, ood_metrics, fpr_at_tpr_openood,
                                aupr_in_openood, aupr_out_openood, roc_points_openood])
def test_errors(fn):
    good = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="ind_scores is empty"):
        fn(torch.tensor([]), good)
    with pytest.raises(ValueError, match="ood_scores is empty"):
        fn(good, torch.tensor([]))
    with pytest.raises(ValueError, match="ood_scores has 1 non-finite"):
        fn(good, torch.tensor([0.3, math.nan]))
    with pytest.raises(ValueError, match="ind_scores has 2 non-finite"):
        fn(torch.tensor([math.inf, -math.inf]), good)
    with pytest.raises(ValueError, match="must be 1-D"):
        fn(good[:, None], good)


def test_aupr_and_fpr_argument_errors():
    with pytest.raises(ValueError, match="neg_scores has 1 non-finite"):
        aupr(torch.tensor([1.0]), torch.tensor([math.nan]))
    with pytest.raises(ValueError, match="pos_scores is empty"):
        aupr(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr(torch.ones(3), torch.ones(3), tpr=0.0)
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr_openood(torch.ones(3), torch.ones(3), tpr=1.5)
    with pytest.raises(ValueError, match="pos_scores is empty"):
        aupr_openood(torch.tensor([]), torch.tensor([1.0]))


# ---------------------------------------------------------------------------
# OpenOOD v1.5's conventions (openood/evaluators/metrics.py, auc_and_fpr_recall), checked against sklearn


def openood_reference(ind, ood, tpr=0.95, drop_intermediate=True):
    """OpenOOD's computation verbatim: label -1 = OOD, conf = -score (higher = more InD)."""
    y, s = sk_labels(ind, ood)
    ood_indicator, conf = y, -s
    fpr_list, tpr_list, _ = roc_curve(ood_indicator, -conf, drop_intermediate=drop_intermediate)
    precision_in, recall_in, _ = precision_recall_curve(1 - ood_indicator, conf)
    precision_out, recall_out, _ = precision_recall_curve(ood_indicator, -conf)
    return {
        "fpr": float(fpr_list[np.argmax(tpr_list >= tpr)]),
        "auroc": auc(fpr_list, tpr_list),
        "aupr_in": auc(recall_in, precision_in),
        "aupr_out": auc(recall_out, precision_out),
        "curve": (fpr_list, tpr_list),
    }


def random_cases(seed: int):
    """Heavily tied integer scores (2 to 6 distinct values, sizes 1 to 80) and continuous ones."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(25):
        n_ind, n_ood = (int(n) for n in torch.randint(1, 81, (2,), generator=g))
        high = int(torch.randint(2, 7, (1,), generator=g))
        shift = int(torch.randint(0, 3, (1,), generator=g))
        yield (torch.randint(0, high, (n_ind,), generator=g).double(),
               torch.randint(shift, high + shift, (n_ood,), generator=g).double())
    for n_ind, n_ood in ((1, 1), (3, 200), (200, 3), (97, 131)):
        yield torch.randn(n_ind, generator=g), torch.randn(n_ood, generator=g) + 0.7


@pytest.mark.parametrize("seed", range(8))
def test_openood_metrics_match_sklearn(seed):
    for ind, ood in random_cases(seed):
        for drop in (True, False):
            fpr_list, tpr_list = roc_points_openood(ind, ood, drop_intermediate=drop)
            ref = openood_reference(ind, ood, drop_intermediate=drop)
            np.testing.assert_array_equal(fpr_list.numpy(), ref["curve"][0])
            np.testing.assert_array_equal(tpr_list.numpy(), ref["curve"][1])
            for tpr in (0.95, 0.9, 0.5, 1.0):
                got = fpr_at_tpr_openood(ind, ood, tpr, drop_intermediate=drop)
                assert got == pytest.approx(openood_reference(ind, ood, tpr, drop)["fpr"], abs=1e-12)
        ref = openood_reference(ind, ood)
        m = ood_metrics(ind, ood)
        assert m["fpr95_openood"] == pytest.approx(ref["fpr"], abs=1e-12)
        assert m["aupr_in_openood"] == pytest.approx(ref["aupr_in"], abs=1e-12)
        assert m["aupr_out_openood"] == pytest.approx(ref["aupr_out"], abs=1e-12)
        assert m["auroc"] == pytest.approx(ref["auroc"], abs=1e-12)  # the trapezoid ROC area is the U statistic


def test_aupr_openood_hand_computed():
    # Descending 0.9(+), 0.8(-), 0.7(+): (R, P) = (0, 1) start, (1/2, 1), (1/2, 1/2), (1, 2/3).
    pos, neg = torch.tensor([0.9, 0.7]), torch.tensor([0.8])
    want = 0.5 * (1 + 1) / 2 + 0.0 + 0.5 * (1 / 2 + 2 / 3) / 2
    assert aupr_openood(pos, neg) == pytest.approx(want, abs=1e-15)
    assert aupr_openood(pos, neg) != pytest.approx(aupr(pos, neg))  # trapezoid is not average precision
    y, s = np.r_[1, 1, 0], np.r_[0.9, 0.7, 0.8]
    precision, recall, _ = precision_recall_curve(y, s)
    assert auc(recall, precision) == pytest.approx(want, abs=1e-15)


def test_drop_intermediate_changes_fpr95():
    # 20 OOD: 10 alone at the top (100..109), 10 tied one-to-one with InD at 1..10; 10 more InD at -1..-10.
    # From threshold 10 down the curve is a straight run of (+1 fp, +1 tp) steps, so sklearn drops its
    # inner points. Un-thinned, 95% recall (19 OOD) is first reached at threshold 2 with 9 of 20 InD above;
    # thinned, the next kept point is the run's end at threshold 1 with 10 of 20 InD.
    ood = torch.cat([torch.arange(100, 110), torch.arange(1, 11)]).double()
    ind = torch.cat([torch.arange(1, 11), -torch.arange(1, 11)]).double()
    thinned, full = fpr_at_tpr_openood(ind, ood), fpr_at_tpr_openood(ind, ood, drop_intermediate=False)
    assert (full, thinned) == (9 / 20, 10 / 20)
    assert thinned == openood_reference(ind, ood)["fpr"]
    assert full == openood_reference(ind, ood, drop_intermediate=False)["fpr"]
    assert ood_metrics(ind, ood)["fpr95_openood"] == thinned


@pytest.mark.parametrize("seed", range(6))
def test_openood_fpr_is_classic_with_roles_swapped(seed):
    for ind, ood in random_cases(seed):
        for tpr in (0.95, 0.8, 1.0):
            # Without thinning: the largest threshold detecting >= tpr of OOD is the classic rule applied to
            # (-ood, -ind), i.e. OOD as the class to keep, on negated scores. Exactly, ties included.
            full = fpr_at_tpr_openood(ind, ood, tpr, drop_intermediate=False)
            assert full == fpr_at_tpr(-ood, -ind, tpr)
            # Thinning keeps a subset of points, so the first one reaching tpr can only come later.
            assert fpr_at_tpr_openood(ind, ood, tpr) >= full
        # With no score shared by InD and OOD, a dropped point with fp steps on both sides has no tp
        # step and cannot be the first to reach tpr: the two FPR@95 coincide.
        if not np.intersect1d(ind.numpy(), ood.numpy()).size:
            assert fpr_at_tpr_openood(ind, ood) == fpr_at_tpr(-ood, -ind)


def test_summary_and_table_carry_both_fpr_conventions():
    from diffguard_pl.detectors.results import format_table, summarize

    ind, ood = tied_scores(4, 40, 30)
    far = ood + 3
    names = {"a_rather_long_near_set_name": ("near", ood), "far_set": ("far", far)}
    records = {"id": [], "set": [], "split": [], "label": [], "pred": [], "depth": [], "unet_evals": [], "msp": []}
    for set_name, values in [("ind", ind)] + [(n, v) for n, (_, v) in names.items()]:
        for i, v in enumerate(values.tolist()):
            for key, value in (("id", f"{set_name}{i}"), ("set", set_name), ("split", "test"),
                               ("label", 0 if set_name == "ind" else -1), ("pred", 0), ("depth", 1),
                               ("unet_evals", 1), ("msp", v)):
                records[key].append(value)
    groups = {n: g for n, (g, _) in names.items()}
    result = summarize(records, groups)
    entry = result["detectors"]["msp"]
    table = format_table(result, groups).splitlines()
    ci = entry["near"].pop("auroc_ci")  # a 95% bootstrap interval around the point estimate
    lo, hi = ci["lo"], ci["hi"]
    assert lo <= entry["near"]["auroc"] <= hi and 0 < hi - lo < 0.5
    assert entry["near"] == {k: ood_metrics(ind, ood)[k] for k in ("auroc", "fpr95_classic", "fpr95_openood")}
    assert entry["far"]["fpr95_openood"] == fpr_at_tpr_openood(ind, far)
    header = [h.strip() for h in table[0].split("  ") if h.strip()]
    assert header[1:3] == list(groups)  # full set names
    assert header[3:] == [f"{g} {k}" for g in ("near", "far") for k in ("AUROC", "FPR@95 classic", "FPR@95 OpenOOD")]
    near_auroc = f"{100 * entry['near']['auroc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert near_auroc in table[2] and f"{100 * entry['near']['fpr95_openood']:.1f}" in table[2]
    footer = "\n".join(table[3:])
    assert "%" in footer and "FPR@95 classic: OOD accepted" in footer and "FPR@95 OpenOOD: InD flagged" in footer
