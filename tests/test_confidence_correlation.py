"""benchmarks/experiments/confidence_correlation.py: Spearman's rho with ties, per set and over all rows."""

import pytest
import torch
from scipy.stats import spearmanr

from benchmarks.experiments import confidence_correlation as cc


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (200,), generator=g).double()  # many ties
    b = a + torch.randn(200, generator=g, dtype=torch.float64)
    assert cc.spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert cc.spearman(a, -a) == pytest.approx(-1.0)


def test_correlations_per_set_and_over_all_rows(tmp_path):
    rows = [{"set": s, "diffguard/l2": str(v), "msp": str(w)}
            for s, pairs in (("ind", [(1, 3), (2, 2), (3, 1)]), ("near", [(1, 1), (2, 2), (5, 3)])) for v, w in pairs]
    rho = cc.correlations(rows, "diffguard/l2", "msp")
    assert rho["ind"] == pytest.approx(-1.0) and rho["near"] == pytest.approx(1.0)
    assert rho["all"] == pytest.approx(spearmanr([1, 2, 3, 1, 2, 5], [3, 2, 1, 1, 2, 3]).statistic)
