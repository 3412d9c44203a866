"""The Python API (diffguard_pl/api.py), directly: presets by name, DiffGuard.fit / score, Baseline.fit / score, and
one clear error for bad input."""

import pytest
import torch
from pytorch_ood.api import RequiresFittingException
from pytorch_ood.metrics import OODMetrics
from pytorch_ood.utils import GridSearch
from torch.utils.data import DataLoader, TensorDataset

from diffguard_pl.api import Baseline, DiffGuard, load_preset, presets
from diffguard_pl.detectors.baselines import KNN
from diffguard_pl.detectors.classifier_parts import DetectorUnavailable
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.errors import ConfigError
from diffguard_pl.method.pipeline import check_images

from helpers.models import small_classifier

SHORT = ("diffguard.num_steps=6", "diffguard.depth=3")


@pytest.fixture(scope="module")
def diffguard():
    return DiffGuard.from_preset("digits_gdm", *SHORT)


@pytest.fixture(scope="module")
def images(benchmark):
    return benchmark.test.images[:6], benchmark.ood["digits_6to9"].test.images[:6]


def test_presets_by_name():
    assert {"digits_gdm", "digits_classifier_free", "fashion_gdm"} <= set(presets())
    cfg = load_preset("digits_gdm", *SHORT)
    assert (cfg.diffguard.num_steps, cfg.diffguard.depth) == (6, 3) and cfg.models.classifier.startswith("/")
    with pytest.raises(ConfigError, match=r"no preset 'digits_gmd': choose one of \["):
        load_preset("digits_gmd")


def test_diffguard_fit_and_score(diffguard, images):
    ind, ood = images
    assert diffguard.fit(ind) is diffguard  # nothing to learn
    scores = diffguard.score(ind)
    assert scores.dtype == torch.float64 and scores.shape == (6,) and torch.isfinite(scores).all()
    assert torch.equal(scores, diffguard(ind)["scores"]["l2"].double().cpu()) and diffguard.predict == diffguard.score
    assert auroc(scores, diffguard.score(ood)) > 0.5


@pytest.mark.parametrize("bad, message", [
    (lambda x: x * 2 - 1, r"images must lie in \[0, 1\], got \[-1"),
    (lambda x: x[0], r"images must be a tensor \[N, C, H, W\], got Tensor \[1, 16, 16\]"),
    (lambda x: x.masked_fill(x > 0.5, float("nan")), "input images contain NaN or Inf"),
])
def test_bad_images_are_refused_by_one_check(diffguard, images, bad, message):
    x = bad(images[0])
    for entry_point in (check_images, diffguard.score, diffguard.pipeline.invert,
                        Baseline("msp", diffguard.classifier).score):
        with pytest.raises(ValueError, match=message):
            entry_point(x)


def test_baseline_is_the_registry_detector(benchmark, images):
    classifier = small_classifier()
    train, (ind, ood) = benchmark.train.images[:200], images
    knn = Baseline("knn", classifier, k=10).fit(train)
    with torch.no_grad():
        features = [classifier.forward_with_features(x)[1] for x in (train, ind)]
    direct = KNN(k=10).fit_features(features[0]).predict_features(features[1])
    assert torch.equal(knn.score(ind), direct) and knn.get_hyperparameters() == {"k": 10}
    assert Baseline("vim", classifier).get_hyperparameters() == {"dim": 64}  # the ViM paper's D // 2
    odin = Baseline("odin", classifier).fit()  # learns nothing; reads the images and their gradients
    assert odin.score(ood).shape == (6,) and not odin.requires_fit


def test_baseline_refuses_what_it_cannot_do(benchmark):
    classifier = small_classifier()
    with pytest.raises(ValueError, match="unknown classifier detector 'kn': choose from msp, "):
        Baseline("kn", classifier)
    with pytest.raises(ValueError, match="knn has no hyperparameter dim: it has k"):
        Baseline("knn", classifier, dim=3)
    with pytest.raises(DetectorUnavailable, match="webo cannot run on this classifier: needs per-class energy"):
        Baseline("webo", classifier)
    with pytest.raises(RequiresFittingException, match="knn is not fitted yet"):
        Baseline("knn", classifier).score(benchmark.val.images[:2])
    train = benchmark.train
    with pytest.raises(DetectorUnavailable, match="mds cannot be fitted on these data: needs the class labels"):
        Baseline("mds", classifier).fit(train.images[:100])
    with pytest.raises(ValueError, match=r"baselines.params.knn.k=500 must lie in \(0, 100\]"):
        Baseline("knn", classifier, k=500).fit(train.images[:100])
    no_class_0 = train.labels[:100] > 0
    with pytest.raises(DetectorUnavailable, match=r"mds cannot be fitted on these data: refuses these training "
                                                  r"samples \(pytorch_ood.detector.Mahalanobis: an assertion"):
        Baseline("mds", classifier).fit([(train.images[:100][no_class_0], train.labels[:100][no_class_0])])
    labelled = DataLoader(TensorDataset(train.images[:100], train.labels[:100]), batch_size=32)
    assert Baseline("mds", classifier).fit(labelled).score(benchmark.val.images[:4]).shape == (4,)


def test_pytorch_ood_takes_a_baseline_as_it_is(benchmark, images):
    """OODMetrics and GridSearch work on Baseline unchanged; GridSearch keeps the k with the best AUROC."""
    classifier = small_classifier()
    ind, ood = images
    x = torch.cat([ind, ood])
    y = torch.cat([torch.zeros(6, dtype=torch.long), -torch.ones(6, dtype=torch.long)])
    val = DataLoader(TensorDataset(x, y), batch_size=4)
    train = DataLoader(TensorDataset(benchmark.train.images[:120], benchmark.train.labels[:120]), batch_size=40)
    knn = Baseline("knn", classifier)
    search = GridSearch(knn, train, val, hyperparameter_space={"k": [1, 5, 20]})
    best = search.run()
    ours = {k: auroc(*(Baseline("knn", classifier, k=k).fit(train).score(s) for s in (ind, ood))) for k in (1, 5, 20)}
    assert best == {"k": max(ours, key=lambda k: (ours[k], -k))} and knn.get_hyperparameters() == best
    for result in search.results_:
        assert result["score"] == pytest.approx(ours[result["params"]["k"]], abs=1e-12)
    metrics = OODMetrics()
    for images_, labels in val:
        metrics.update(knn(images_), labels)
    assert metrics.compute()["AUROC"] == pytest.approx(ours[best["k"]], abs=1e-9)
