import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from diffguard_pl.metrics import aupr, aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics


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
    assert m == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    m = ood_metrics(ood, ind)
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())


def test_constant_scores():
    m = ood_metrics(torch.zeros(10), torch.zeros(5))
    assert m["auroc"] == 0.5 and m["fpr95"] == 1.0
    assert m["aupr_out"] == pytest.approx(5 / 15) and m["aupr_in"] == pytest.approx(10 / 15)


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


@pytest.mark.parametrize("fn", [auroc, fpr_at_tpr, aupr_in, aupr_out, ood_metrics])
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
