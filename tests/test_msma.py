"""MSMA (diffguard_pl/method/msma.py): the norms against the paper's equations, per-sample seeding, the GMM fit,
and a sanity check on the trained digits model."""

import math

import numpy as np
import pytest
import torch

from diffguard_pl.method.msma import SALT, SIGMA_HIGH, SIGMA_LOW, MSMAGMM, default_levels, score_norms, unet_evals
from diffguard_pl.seeding import sample_seed
from tests.helpers.models import ALPHAS, small_diffusion

IDS = ["a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def model64():
    model = small_diffusion()
    model.unet.double()
    return model


@pytest.fixture(scope="module")
def images64():
    return torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@torch.no_grad()
def reference_norms(model, images, ids, levels, seed=0, noised=True):
    """One sample, one level at a time: x_t = sqrt(a_t) (2 x - 1) + sqrt(1 - a_t) n, v_t = ||eps(x_t, t)||_2, with
    n from the generator of (id, t)."""
    out = torch.empty(len(images), len(levels), dtype=torch.float64)
    for i, (image, sample_id) in enumerate(zip(images, ids)):
        for k, t in enumerate(levels):
            a = float(ALPHAS[t])
            g = torch.Generator().manual_seed(sample_seed(f"{sample_id}@t{t}", seed + SALT))
            n = torch.randn(image.shape, generator=g, dtype=torch.float64)
            x_t = math.sqrt(a) * (2 * image - 1) + (math.sqrt(1 - a) * n if noised else 0)
            eps = model.unet(x_t[None], torch.tensor([t])).sample[0]
            out[i, k] = math.sqrt(float((eps**2).sum()))
    return out


@pytest.mark.parametrize("noised", [True, False])
def test_batched_norms_equal_the_per_sample_equations(model64, images64, noised):
    levels = default_levels(1000, 10, ALPHAS).tolist()
    batched = score_norms(model64, images64, IDS, levels, seed=5, noised=noised)
    assert batched.dtype == torch.float64 and batched.shape == (6, 10)
    torch.testing.assert_close(batched, reference_norms(model64, images64, IDS, levels, 5, noised),
                               rtol=1e-9, atol=0)


def test_norms_do_not_depend_on_batch_order_or_other_levels_but_on_ids(model64, images64):
    levels = [3, 40, 200, 600]
    together = score_norms(model64, images64, IDS, levels)
    alone = torch.cat([score_norms(model64, images64[i : i + 1], IDS[i : i + 1], levels) for i in range(6)])
    order = [4, 1, 5, 0, 3, 2]
    shuffled = score_norms(model64, images64[order], [IDS[i] for i in order], levels, rows_per_call=7)
    torch.testing.assert_close(alone, together, rtol=1e-9, atol=0)
    torch.testing.assert_close(shuffled, together[order], rtol=1e-9, atol=0)
    torch.testing.assert_close(score_norms(model64, images64, IDS, levels[1:3]), together[:, 1:3], rtol=1e-9, atol=0)
    other_ids = score_norms(model64, images64, [i + "'" for i in IDS], levels)
    other_seed = score_norms(model64, images64, IDS, levels, seed=1)
    assert ((other_ids - together).abs() > 1e-6 * together).all()
    assert ((other_seed - together).abs() > 1e-6 * together).all()
    assert score_norms(model64, images64[:0], [], levels).shape == (0, 4)


def test_levels_follow_the_authors_geometric_sigmas():
    levels = default_levels(1000, 10, ALPHAS)
    a = ALPHAS[levels]
    log_sigma = 0.5 * torch.log((1 - a) / a)
    wanted = torch.linspace(math.log(2 * SIGMA_LOW), math.log(2 * SIGMA_HIGH), 10, dtype=torch.float64)
    steps = 0.5 * torch.log((1 - ALPHAS) / ALPHAS).diff()  # log-sigma gap between neighbouring timesteps
    assert (levels.diff() > 0).all()
    assert ((log_sigma - wanted).abs() <= steps[levels].clamp_min(steps[levels - 1])).all()
    assert default_levels(1000, 10).tolist() == list(range(50, 1000, 100))
    assert unet_evals(levels) == 10
    with pytest.raises(ValueError, match="distinct timesteps"):
        default_levels(1000, 300, ALPHAS)
    with pytest.raises(ValueError, match="distinct"):
        score_norms(small_diffusion(), torch.rand(1, 1, 16, 16), ["x"], [5, 5])


def clusters(n, seed):
    g = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 6.0, 0.0]])
    return centres[g.integers(0, 2, n)] + g.normal(size=(n, 3))


def test_gmm_is_fitted_only_on_its_data_and_deterministic():
    from sklearn.mixture import GaussianMixture
    from sklearn.preprocessing import StandardScaler

    train, test = clusters(120, 0), clusters(40, 1)
    kept = train.copy()
    first = MSMAGMM(components=(1, 2, 3, 4), folds=5).fit(torch.from_numpy(train))
    again = MSMAGMM(components=(1, 2, 3, 4), folds=5).fit(train)
    assert np.array_equal(train, kept)
    assert torch.equal(first.score(test), again.score(test))
    assert first.n_components >= 2 and max(first.cv_loglik, key=first.cv_loglik.get) == first.n_components
    # the same as a scaler and mixture fitted by hand on exactly the training vectors
    scaler = StandardScaler().fit(train)
    gmm = GaussianMixture(first.n_components, covariance_type="full", random_state=0).fit(scaler.transform(train))
    np.testing.assert_allclose(first.score(test).numpy(), -gmm.score_samples(scaler.transform(test)), rtol=1e-12)
    # more data changes the fit; far-away vectors score as more OOD
    wider = MSMAGMM(components=(1, 2, 3, 4), folds=5).fit(np.concatenate([train, test]))
    assert not torch.allclose(wider.score(test), first.score(test))
    assert first.score(test + 20).min() > first.score(test).max()
    with pytest.raises(RuntimeError, match="not fitted"):
        MSMAGMM().score(test)
    with pytest.raises(ValueError, match="levels"):
        first.score(test[:, :2])
    with pytest.raises(ValueError, match="too few"):
        MSMAGMM().fit(train[:2])  # 2 folds of 1 vector: no 2-component fit


def test_trained_digits_model_separates_digits_from_noise_and_constant_images(benchmark):
    from diffguard_pl.models import load_diffusion

    model = load_diffusion("checkpoints/digits/diffusion_uncond")
    levels = default_levels(model.num_train_timesteps, 10, model.alphas_cumprod)
    train = benchmark.train
    norms = score_norms(model, train.images[:100], train.ids[:100], levels)
    gmm = MSMAGMM(components=(1, 2, 4), folds=5).fit(norms)
    scores = {}
    for name, images in [("val", benchmark.val), ("noise", benchmark.ood["noise"].test),
                         ("constant", benchmark.ood["constant"].test)]:
        scores[name] = gmm.score(score_norms(model, images.images[:8], images.ids[:8], levels))
    # measured (100 train digits, 8 images each; 1 component chosen): val NLL 9.7..19.7, noise 34.8..150,
    # constant 50..203 (with 40 train digits the margin shrank to 30.5 vs 30.6, hence 100)
    assert scores["noise"].min() > scores["val"].max()
    assert scores["constant"].min() > scores["val"].max()
