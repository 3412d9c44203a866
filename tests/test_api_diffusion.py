"""The diffusion detectors in the Python API (diffguard_pl/api.py: DiffusionBaseline): the scores of the detectors
themselves (diffguard_pl/detectors/diffusion.py), ids from the pixels so that a score depends on neither batch nor
order, each head fitted on the images the registry names, presets by name, clear errors, and pytorch-ood's protocol
(fit(loader) / predict(x), OODMetrics, GridSearch). Cheap params on the committed Digits-OOD models."""

import pytest
import torch
from pytorch_ood.api import RequiresFittingException
from pytorch_ood.metrics import OODMetrics
from pytorch_ood.utils import GridSearch
from torch.utils.data import DataLoader, TensorDataset

from diffguard_pl.api import DiffusionBaseline, sample_ids
from diffguard_pl.detectors import registry
from diffguard_pl.detectors.diffusion import DiffusionDetector
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.errors import ConfigError
from diffguard_pl.integrations import pytorch_ood
from diffguard_pl.models import load_classifier, load_diffusion

from helpers.paths import CHECKPOINTS

# UNet evaluations per image: 3, 3, 6, 6. DiffPath's 10-fold CV of 50 and 100 mixture components needs more than
# 111 training rows; 130 training images are read by DiffPath and MSMA, 24 validation images by DDPM-OOD.
CHEAP = {registry.MSMA: {"levels": 3}, registry.DIFFPATH: {"num_steps": 3},
         registry.LMD: {"repetitions": 2, "num_steps": 3}, registry.DDPM_OOD: {"num_steps": 4, "skip": 2}}
TRAIN, VAL = 130, 24


@pytest.fixture(scope="module")
def models():
    return load_diffusion(CHECKPOINTS / "diffusion_uncond"), load_classifier(CHECKPOINTS / "classifier")


@pytest.fixture(scope="module")
def images(benchmark):
    """Six InD and six near-OOD test images, and the InD images each detector is fitted on."""
    test = torch.cat([benchmark.test.images[:6], benchmark.ood["digits_6to9"].test.images[:6]])
    fit_on = {registry.FIT_TRAIN: benchmark.train.images[:TRAIN], registry.FIT_VAL: benchmark.val.images[:VAL],
              registry.FIT_NONE: None}
    return test, fit_on


@pytest.fixture(scope="module")
def fitted(models, images):
    diffusion, _ = models
    _, fit_on = images
    out = {}
    for name, params in CHEAP.items():
        detector = DiffusionBaseline(name, diffusion, **params)
        out[name] = detector.fit(fit_on[detector.fit_on])
    return out


@pytest.mark.parametrize("name", list(CHEAP))
def test_scores_are_the_detectors_own(name, models, images, fitted):
    """The API's scores equal DiffusionDetector's statistics / fit / score, ids the digests of the pixels."""
    diffusion, _ = models
    test, fit_on = images
    direct = DiffusionDetector(name, CHEAP[name], diffusion)
    train = fit_on[direct.fit_on]
    if train is not None:  # in the API's batches of 64: float32 sums in other batches round otherwise
        parts = [direct.statistics(x, sample_ids(x)) for x in train.split(64)]
        direct.fit({kind: torch.cat([p[kind] for p in parts]) for kind in parts[0]})
    expected = direct.score(direct.statistics(test, sample_ids(test)))
    scores = fitted[name].score(test)
    assert torch.equal(scores, expected) and scores.dtype == torch.float64 and scores.shape == (12,)
    assert torch.equal(fitted[name].predict(test), scores)
    assert fitted[name].unet_evals_per_image() == direct.unet_evals_per_image() == registry.diffusion_detector(
        name).cost(registry.diffusion_params(name, CHEAP[name]))
    described = fitted[name].describe_fit()
    assert described["params"] == direct.params and described["unet_evals_per_image"] > 0
    assert described.get("fitted_on") == (None if train is None else f"{len(train)} {direct.fit_on}")
    # digits 0-5 against 6-9, 6 each; measured: diffpath 0.94, ddpm_ood 0.83, msma 0.67, lmd 0.53 (3 steps)
    assert name == registry.LMD or auroc(scores[:6], scores[6:]) > 0.6


def test_a_score_depends_on_the_image_not_its_batch_or_place(fitted, images):
    """Ids are digests of the pixels: batches of 5 in reverse order score the images alike (up to float32
    rounding, as tests/test_pytorch_ood.py measured); ids by position draw other noise and move the scores."""
    test, _ = images
    lmd = fitted[registry.LMD]
    whole = lmd.score(test)
    lmd.batch_size = 5
    try:
        reversed_in_fives = lmd.score(test.flip(0)).flip(0)
    finally:
        lmd.batch_size = 64
    torch.testing.assert_close(reversed_in_fives, whole, rtol=1e-4, atol=0)
    assert torch.equal(lmd.score(test, ids=sample_ids(test)), whole)
    by_position = lmd.score(test, ids=[str(i) for i in range(len(test))])
    assert (by_position - whole).abs().max() > 1e-3 * whole.abs().max()
    msma = fitted[registry.MSMA]
    torch.testing.assert_close(msma.score(test[[7, 2]]), msma.score(test)[[7, 2]], rtol=1e-4, atol=0)


def test_errors_name_the_problem_and_the_fix(models, images):
    diffusion, _ = models
    test, _ = images
    with pytest.raises(RequiresFittingException, match="msma is not fitted yet: call fit\\(\\) with InD training "
                                                       "images first"):
        DiffusionBaseline(registry.MSMA, diffusion, levels=3).predict(test)
    ddpm_ood = DiffusionBaseline(registry.DDPM_OOD, diffusion, num_steps=4, skip=2)
    with pytest.raises(RequiresFittingException, match="call fit\\(\\) with InD validation images \\(its per-level"):
        ddpm_ood.score(test)
    with pytest.raises(ValueError, match="ddpm_ood is fitted on InD validation images .*: pass them to fit"):
        ddpm_ood.fit()
    with pytest.raises(ValueError, match="unknown diffusion detector 'msm': choose from ddpm_ood, lmd, "):
        DiffusionBaseline("msm", diffusion)
    with pytest.raises(ValueError, match="msma has no parameter 'k': its parameters are levels"):
        DiffusionBaseline(registry.MSMA, diffusion, k=3)
    with pytest.raises(ValueError, match="needs the classifier's features: pass classifier="):
        DiffusionBaseline(registry.LMD, diffusion, distance="features")
    with pytest.raises(ValueError, match="3 ids for 12 images: pass one id per image"):
        DiffusionBaseline(registry.LMD, diffusion, **CHEAP[registry.LMD]).score(test, ids=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        DiffusionBaseline(registry.LMD, diffusion, **CHEAP[registry.LMD]).score(test * 2 - 1)
    only_ood = [(test[:4], -torch.ones(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="no InD images given: every label is < 0"):
        ddpm_ood.fit(only_ood)
    lmd = DiffusionBaseline(registry.LMD, diffusion, **CHEAP[registry.LMD])
    assert not lmd.requires_fit and lmd.fit() is lmd and lmd.fit(test) is lmd and lmd.fitted_on is None


def test_from_preset_loads_the_models_and_the_params(models, images, fitted):
    test, _ = images
    with pytest.raises(ValueError, match="unknown diffusion detector 'lmdd'"):
        DiffusionBaseline.from_preset("digits_gdm", "lmdd")
    lmd = DiffusionBaseline.from_preset("digits_gdm", registry.LMD, **CHEAP[registry.LMD])
    assert lmd.get_hyperparameters() == registry.diffusion_params(registry.LMD, CHEAP[registry.LMD])
    assert not lmd.diffusion.conditional and lmd.classifier is not None and lmd.unet_evals_per_image() == 6
    assert torch.equal(lmd.score(test), fitted[registry.LMD].score(test))  # the committed diffusion_uncond
    # The preset's diffusion_detectors.params, then the keywords; the classifier gives DDPM-OOD its features.
    ddpm_ood = DiffusionBaseline.from_preset("digits_gdm", registry.DDPM_OOD, "diffusion_detectors.names=[ddpm_ood]",
                                             "diffusion_detectors.params.ddpm_ood.num_steps=4",
                                             "diffusion_detectors.params.ddpm_ood.skip=3", skip=2,
                                             features="classifier")
    assert ddpm_ood.get_hyperparameters() == {"num_steps": 4, "skip": 2, "features": "classifier"}
    assert ddpm_ood.detector.features is not None and ddpm_ood.fit_on == registry.FIT_VAL
    with pytest.raises(ConfigError, match="no preset 'digits_gmd'"):
        DiffusionBaseline.from_preset("digits_gmd", registry.LMD)


def test_pytorch_ood_takes_a_diffusion_detector_as_it_is(benchmark, images, fitted):
    """fit(loader) on the loader's InD samples (OOD-labelled ones left out), predict(x) in OODMetrics' loop, a fused
    DiffGuard detector's partner, GridSearch over LMD's steps."""
    test, _ = images
    assert pytorch_ood.DiffusionBaseline is DiffusionBaseline
    train = benchmark.train
    ood = benchmark.ood["digits_6to9"].val.images[:4]
    # batches of 64: the InD rows fall into the same batches as the tensor's (float32 sums alike, equal fits)
    fit_x = torch.cat([train.images[:TRAIN], ood])
    fit_y = torch.cat([train.labels[:TRAIN], -torch.ones(4, dtype=torch.long)])
    msma = fitted[registry.MSMA]
    detector = DiffusionBaseline.from_preset("digits_gdm", registry.MSMA, **CHEAP[registry.MSMA])
    detector.fit(DataLoader(TensorDataset(fit_x, fit_y), batch_size=64))
    assert detector.fitted_on == TRAIN and detector.describe_fit() == msma.describe_fit()
    y = torch.cat([torch.zeros(6, dtype=torch.long), -torch.ones(6, dtype=torch.long)])
    loader = DataLoader(TensorDataset(test, y), batch_size=4)
    metrics, scores = OODMetrics(), []
    for x, labels in loader:
        scores.append(detector(x))
        metrics.update(scores[-1], labels)
    scores = torch.cat(scores)
    assert metrics.compute()["AUROC"] == pytest.approx(auroc(scores[:6], scores[6:]), abs=1e-9)
    torch.testing.assert_close(scores, msma.score(test), rtol=1e-4, atol=0)
    # a fused DiffGuard detector's partner, fitted beforehand on InD training images and kept as it is
    fused = pytorch_ood.DiffGuardDetector.from_preset("digits_gdm", "diffguard.num_steps=6", "diffguard.depth=3",
                                                      partner=detector, fit_partner=False)
    fused.fit(DataLoader(TensorDataset(benchmark.val.images[:8], benchmark.val.labels[:8]), batch_size=4))
    assert detector.fitted_on == TRAIN and set(fused.norm) == {"diffguard", "partner"}
    assert torch.isfinite(fused.predict(test[:4])).all()
    lmd = DiffusionBaseline(registry.LMD, msma.diffusion, **CHEAP[registry.LMD])
    search = GridSearch(lmd, None, loader, hyperparameter_space={"num_steps": [2, 3]})
    best = search.run()
    assert len(search.results_) == 2 and lmd.get_hyperparameters()["num_steps"] == best["num_steps"]
    assert search.best_score_ == max(r["score"] for r in search.results_)
