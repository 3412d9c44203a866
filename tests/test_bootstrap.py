"""Bootstrap intervals of AUROC: each replicate is an AUROC of resampled scores, intervals are percentiles,
and paired differences compare two detectors on identical replicates."""

import pytest
import torch

from diffguard_pl.detectors.bootstrap import group_mean, interval, paired_difference, replicate_aurocs
from diffguard_pl.detectors.metrics import auroc


def scores(n, shift, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_a_replicate_is_the_auroc_of_its_resample():
    """Replaying the documented draws (InD first, then each OOD set in order) gives each replicate's AUROC."""
    ind, oods = scores(30, 0.0, 1), {"a": scores(20, 1.0, 2), "b": scores(25, 0.5, 3)}
    reps = replicate_aurocs(ind, oods, n=5, seed=7)
    g = torch.Generator().manual_seed(7)
    ind_idx = torch.randint(0, 30, (5, 30), generator=g)
    idx = {name: torch.randint(0, len(o), (5, len(o)), generator=g) for name, o in oods.items()}
    for r in range(5):
        for name, ood in oods.items():
            assert reps[name][r].item() == pytest.approx(auroc(ind[ind_idx[r]], ood[idx[name][r]]), abs=1e-12)


def test_ties_count_half_and_identical_scores_give_one_half():
    same = torch.full((10,), 2.0, dtype=torch.float64)
    assert torch.equal(replicate_aurocs(same, {"x": same.clone()}, n=4)["x"], torch.full((4,), 0.5, dtype=torch.float64))


def test_interval_brackets_the_estimate_and_narrows_with_more_samples():
    small = replicate_aurocs(scores(40, 0, 1), {"o": scores(40, 1, 2)}, n=400)["o"]
    large = replicate_aurocs(scores(400, 0, 3), {"o": scores(400, 1, 4)}, n=400)["o"]
    lo_s, hi_s = interval(small)
    lo_l, hi_l = interval(large)
    point = auroc(scores(400, 0, 3), scores(400, 1, 4))
    assert lo_l < point < hi_l and hi_l - lo_l < (hi_s - lo_s) / 2  # ~1/sqrt(10) as wide
    assert interval(torch.arange(101, dtype=torch.float64)) == pytest.approx((2.5, 97.5))


def test_group_mean_averages_per_replicate():
    reps = {"a": torch.tensor([0.2, 0.4]), "b": torch.tensor([0.6, 1.0]), "c": torch.tensor([9.0, 9.0])}
    assert torch.allclose(group_mean(reps, ["a", "b"]), torch.tensor([0.4, 0.7]))


def test_paired_difference_is_zero_against_itself_and_sees_a_real_gain():
    ind, oods = scores(60, 0, 1), {"a": scores(60, 0.6, 2), "b": scores(60, 0.3, 3)}
    assert paired_difference(ind, oods, ind, oods, ["a", "b"], n=200) == (0.0, 0.0, 0.0)
    better = {name: ood + 1.0 for name, ood in oods.items()}  # the same samples, OOD scored higher
    point, lo, hi = paired_difference(ind, better, ind, oods, ["a", "b"], n=200)
    want = sum(auroc(ind, better[m]) - auroc(ind, oods[m]) for m in ("a", "b")) / 2
    assert point == pytest.approx(want) and 0 < lo <= point <= hi
