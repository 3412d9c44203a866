"""DiffGuard as a pytorch-ood Detector (diffguard_pl/integrations/pytorch_ood.py): pytorch-ood's OODMetrics and
GridSearch take it as they are, on both guidance paths, plain or fused; fit does what evaluate.py does first."""

import pytest
import torch
from pytorch_ood.api import RequiresFittingException
from pytorch_ood.metrics import OODMetrics
from pytorch_ood.utils import GridSearch
from torch.utils.data import DataLoader, TensorDataset

from diffguard_pl.api import Baseline
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.integrations.pytorch_ood import DiffGuardDetector, sample_ids
from diffguard_pl.method.aes import lowest_quality

SHORT = ("diffguard.num_steps=6", "diffguard.depth=3")


@pytest.fixture(scope="module")
def loaders(benchmark):
    """Six InD and six near-OOD test images (labels < 0 for OOD, pytorch-ood's convention), and 24 InD validation
    images with some OOD images mixed in (fit must ignore those)."""
    x = torch.cat([benchmark.test.images[:6], benchmark.ood["digits_6to9"].test.images[:6]])
    y = torch.cat([benchmark.test.labels[:6], -torch.ones(6, dtype=torch.long)])
    fit_x = torch.cat([benchmark.val.images[:24], benchmark.ood["digits_6to9"].val.images[:4]])
    fit_y = torch.cat([benchmark.val.labels[:24], -torch.ones(4, dtype=torch.long)])
    return DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(fit_x, fit_y), batch_size=5)


def run_metrics(detector, loader):
    metrics, scores, labels = OODMetrics(), [], []
    for x, y in loader:
        s = detector(x)
        metrics.update(s, y)
        scores.append(s)
        labels.append(y)
    scores, labels = torch.cat(scores), torch.cat(labels)
    return metrics.compute()["AUROC"], auroc(scores[labels >= 0], scores[labels < 0]), scores


@pytest.mark.exactness
@pytest.mark.parametrize("preset", ["digits_gdm", "digits_classifier_free"])
def test_oodmetrics_gets_our_auroc(preset, loaders):
    test, _ = loaders
    detector = DiffGuardDetector.from_preset(preset, *SHORT)
    assert not detector.requires_fit and detector.fit(test) is detector
    theirs, ours, scores = run_metrics(detector, test)
    assert abs(theirs - ours) <= 1e-9 and scores.dtype == torch.float64
    # Ids are digests of the pixels: a sample's score does not depend on its batch. Up to float32 rounding: the
    # models run in float32, and a convolution sums in an order that depends on the batch size, the kernels'
    # instruction set and the thread count. The same samples in batches of 4, 6 and 12 scored up to 4.1e-6 apart
    # (relative; oneDNN AVX-512 and AVX2, 1 and 2 threads), so rtol 1e-4 leaves a margin of 25; ids by batch
    # position instead (other cutouts) move these scores by 1.4e-3 or more, which it still catches.
    x = torch.cat([b for b, _ in test])
    torch.testing.assert_close(detector.predict(x[3:9]), scores[3:9], rtol=1e-4, atol=0)
    assert len(set(sample_ids(x))) == len(x)


def test_fused_detector_fits_partner_and_normalisation_on_ind_samples(loaders, benchmark, capsys):
    test, fit = loaders
    fused = DiffGuardDetector.from_preset("digits_gdm", *SHORT, partner="mds")
    with pytest.raises(RequiresFittingException, match="not normalised yet"):
        fused.predict(benchmark.test.images[:2])
    capsys.readouterr()
    fused.fit(fit)
    evals = int(fused.pipeline.unet_evals(fused.depth))  # the cost, said before the work starts
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"DiffGuardDetector.fit: DiffGuard on each InD image for the z-score normalisation ({evals} UNet "
                      f"evaluations each, {24 * evals:,} in all): 24 images ...")
    assert err[-1].startswith("DiffGuardDetector.fit: DiffGuard on each InD image") and "done in" in err[-1]
    assert set(benchmark.val.labels[:24].tolist()) == set(range(6))  # Mahalanobis needs every class
    ind = benchmark.val.images[:24]  # the loader's InD samples only
    plain = DiffGuardDetector.from_preset("digits_gdm", *SHORT)
    d, p = plain.predict(ind), fused.partner.predict(ind)
    assert fused.norm == {"diffguard": (float(d.mean()), float(d.std())), "partner": (float(p.mean()), float(p.std()))}
    theirs, ours, scores = run_metrics(fused, test)
    assert abs(theirs - ours) <= 1e-9
    # The fusion, in the loader's batches: float32 model outputs in other batches would round otherwise.
    expected = torch.cat([(plain.predict(x) - d.mean()) / d.std() + (fused.partner.predict(x) - p.mean()) / p.std()
                          for x, _ in test])
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)
    # A partner fitted beforehand (on InD training data, as evaluate.py does) is used as it is.
    partner = Baseline("knn", fused.pipeline.classifier, k=5).fit(benchmark.train.images[:100])
    kept = DiffGuardDetector.from_preset("digits_gdm", *SHORT, partner=partner, fit_partner=False).fit(fit)
    assert kept.partner is partner and partner.detector.bank.shape[0] == 100


def test_gridsearch_tunes_depth_scale_and_distance(loaders):
    test, _ = loaders
    detector = DiffGuardDetector.from_preset("digits_classifier_free", *SHORT)
    assert set(detector.hyperparameter_space) == {"depth", "scale", "distance"}
    space = {"depth": [2, 3], "scale": [1.0, 3.0], "distance": ["l2", "ssim"]}
    search = GridSearch(detector, None, test, hyperparameter_space=space)
    best = search.run()
    assert len(search.results_) == 8 and detector.get_hyperparameters() == best
    assert detector.pipeline.cfg.depth == best["depth"]
    assert detector.pipeline.cfg.guidance.classifier_free.omega == best["scale"]  # omega on this path
    assert search.best_score_ == max(r["score"] for r in search.results_)
    with pytest.raises(ValueError, match=r"distance 'lpips' is not computed: choose one of diffguard.distances"):
        detector.set_hyperparameters(distance="lpips")
    with pytest.raises(Exception, match=r"diffguard.depth=7 must lie in \[1, 6\]"):
        detector.set_hyperparameters(depth=7)


def test_fit_calibrates_the_early_stop_on_ind_samples(loaders, benchmark, capsys):
    _, fit = loaders
    detector = DiffGuardDetector.from_preset("digits_gdm", *SHORT, aes_target=0.5)
    assert detector.requires_fit and not detector.pipeline.cfg.aes.enabled
    capsys.readouterr()
    detector.fit(fit)
    assert (f"AES calibration, each InD image inverted to diffguard.depth ({detector.depth} UNet evaluations each, "
            f"{24 * detector.depth} in all): 24 images ...") in capsys.readouterr().err
    ind = benchmark.val.images[:24]
    lows = lowest_quality(DiffGuardDetector.from_preset("digits_gdm", *SHORT).pipeline, ind, sample_ids(ind), "psnr",
                          64)
    aes = detector.pipeline.cfg.aes
    assert aes.enabled and aes.psnr == pytest.approx(float(torch.quantile(lows.double(), 0.5)), abs=1e-9)
    with pytest.raises(ValueError, match=r"aes_target=1.5 must lie in \(0, 1\)"):
        DiffGuardDetector.from_preset("digits_gdm", *SHORT, aes_target=1.5)


def test_fit_refuses_a_classifier_that_does_not_fit_the_loaders_labels(benchmark):
    """evaluate.py's classifier check on the loader's labelled InD samples: labels in another class order put the
    committed classifier's accuracy near chance, which fit refuses (check_classifier=False fits anyway)."""
    x, y = benchmark.val.images[:120], benchmark.val.labels[:120]
    shifted = DataLoader(TensorDataset(x, (y + 1) % 6), batch_size=40)
    detector = DiffGuardDetector.from_preset("digits_gdm", *SHORT, partner="ebo")
    with pytest.raises(ValueError, match=r"does not fit the loader's InD samples: its \d+\.\d% InD validation accuracy "
                                         r"on 120 images is near chance .*check_classifier=False fits anyway"):
        detector.fit(shifted)
    assert detector.norm is None  # refused before any work
    assert DiffGuardDetector.from_preset("digits_gdm", *SHORT, partner="ebo", check_classifier=False).fit(
        shifted).norm is not None
    assert detector.fit(DataLoader(TensorDataset(x, y), batch_size=40)).norm is not None  # its own labels fit
