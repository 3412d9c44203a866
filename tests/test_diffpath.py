"""DiffPath (diffguard_pl/method/diffpath.py): the path statistics against a per-sample loop written from the
authors' code, batch independence, the fitted scorers, and a sanity check on the trained digits model."""

import numpy as np
import pytest
import torch

from diffguard_pl.method.diffpath import (
    STATISTICS, DiffPathGMM, DiffPathKDE, kde_statistic, path_statistics, unet_evals,
)

from helpers.models import ALPHAS, RecordingUNet, small_diffusion


def reference_statistics(unet, alphas_cumprod, image, num_steps=10, clip=True):
    """One image's six statistics, step by step as improved-diffusion's ddim_reverse_sample_loop (respacing
    ``ddim<n>``, clip_denoised) and clear-nus/diffpath's save_*_statistics.py compute them, in numpy float64."""
    T = len(alphas_cumprod)
    kept = list(range(0, T, T // num_steps))
    # improved-diffusion's SpacedDiffusion: betas of the kept steps, cumulative product again; next of last = 0
    a, last, betas = alphas_cumprod.numpy(), 1.0, []
    for t in kept:
        betas.append(1 - a[t] / last)
        last = a[t]
    bar = np.cumprod(1.0 - np.array(betas))
    bar_next = np.append(bar[1:], 0.0)
    x = image.double().numpy()[None] * 2 - 1
    path = []
    for i, t in enumerate(kept):
        with torch.no_grad():
            eps = unet(torch.from_numpy(x), torch.tensor([t])).sample.numpy()
        x0 = np.sqrt(1 / bar[i]) * x - np.sqrt(1 / bar[i] - 1) * eps
        if clip:
            x0 = np.clip(x0, -1, 1)
        eps = (np.sqrt(1 / bar[i]) * x - x0) / np.sqrt(1 / bar[i] - 1)
        path.append(eps[0])
        x = x0 * np.sqrt(bar_next[i]) + np.sqrt(1 - bar_next[i]) * eps
    eps = np.array(path)[None]  # [1, T, C, H, W]
    diff = np.diff(eps, axis=1) * num_steps
    return np.array([np.sum(eps), np.sum(eps ** 2), np.sum(eps ** 3),
                     np.sum(diff), np.sum(diff ** 2), np.sum(diff ** 3)])


def float64_model():
    diffusion = small_diffusion()
    diffusion.unet.double()
    return diffusion


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)


def assert_rows_close(got, want, rtol=1e-9):
    """Relative to each statistic's scale (sum eps and sum d can cancel to near zero)."""
    scale = np.abs(want).max(0, keepdims=True) + 1e-12
    np.testing.assert_allclose(np.asarray(got) / scale, want / scale, rtol=0, atol=rtol)


@pytest.mark.parametrize("num_steps,clip", [(10, True), (4, False)])
def test_statistics_equal_a_per_sample_loop_of_the_authors_equations(num_steps, clip):
    diffusion, x = float64_model(), images(3)
    got = path_statistics(diffusion, x, num_steps, clip_x0=clip)
    assert got.dtype == torch.float64 and got.shape == (3, len(STATISTICS)) and got.device.type == "cpu"
    want = np.stack([reference_statistics(diffusion.unet, ALPHAS, x[i], num_steps, clip) for i in range(3)])
    assert_rows_close(got.numpy(), want)
    # the clipping is exercised: without it the statistics differ
    unclipped = path_statistics(diffusion, x, num_steps, clip_x0=not clip)
    assert not torch.allclose(unclipped, got, rtol=1e-6)


def test_the_path_evaluates_eps_at_the_respaced_timesteps_once_each():
    unet = RecordingUNet(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    from diffguard_pl.models import DiffusionModel

    diffusion = DiffusionModel(unet, ALPHAS)
    stats = path_statistics(diffusion, torch.full((2, 1, 16, 16), 0.5), num_steps=10)
    assert len(unet.calls) == unet_evals(10) == 10
    assert [int(t[0]) for t, _ in unet.calls] == list(range(0, 1000, 100))
    assert torch.isfinite(stats).all()
    with pytest.raises(ValueError, match="at least 2 steps"):
        unet_evals(1)


def test_batch_independence_and_determinism():
    """No randomness at all (deterministic inversion), so no per-sample seeding and no ids: a sample's
    statistics are the same alone, in a batch of 6 and in another order."""
    diffusion, x = float64_model(), images(6, seed=2)
    batch = path_statistics(diffusion, x)
    alone = torch.cat([path_statistics(diffusion, x[i : i + 1]) for i in range(6)])
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    shuffled = path_statistics(diffusion, x[order])
    assert torch.allclose(alone, batch, rtol=1e-9, atol=1e-9)
    assert torch.allclose(shuffled, batch[order], rtol=1e-9, atol=1e-9)
    assert torch.equal(path_statistics(diffusion, x), batch)
    assert not torch.allclose(batch[0], batch[1], rtol=1e-3)  # different images, different statistics


def two_clusters(n, seed):
    g = np.random.default_rng(seed)
    centres = np.array([[0.0] * 6, [4.0, -2.0, 1.0, 3.0, 0.0, -1.0]])
    rows = centres[g.integers(0, 2, n)] + g.normal(size=(n, 6)) * np.array([1, 2, 0.5, 1, 3, 1])
    return torch.from_numpy(rows * 100 + 500)  # scales as raw power sums have them


def test_gmm_is_the_cross_validated_choice_fitted_on_the_training_rows_only():
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import KFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = two_clusters(120, 0), two_clusters(30, 1)
    grid = [(k, c) for c in ("full", "diag") for k in (1, 2, 3)]
    gmm = DiffPathGMM(n_components=(1, 2, 3), covariance_types=("full", "diag"), cv=4).fit(train)

    def model(k, c):
        return Pipeline([("s", StandardScaler()), ("g", GaussianMixture(k, covariance_type=c, max_iter=200,
                                                                         random_state=0))])

    x = train.numpy()
    cv = {(k, c): np.mean([model(k, c).fit(x[a]).score(x[b]) for a, b in KFold(4).split(x)]) for k, c in grid}
    best = max(grid, key=lambda p: cv[p])
    assert (gmm.chosen["n_components"], gmm.chosen["covariance_type"]) == best and best[0] > 1
    assert gmm.cv_score == pytest.approx(cv[best], rel=1e-12)
    want = -model(*best).fit(x).score_samples(test.numpy())
    np.testing.assert_allclose(gmm.score(test).numpy(), want, rtol=1e-12)
    # deterministic, and only the rows handed to fit count
    again = DiffPathGMM(n_components=(1, 2, 3), covariance_types=("full", "diag"), cv=4).fit(train)
    assert torch.equal(again.score(test), gmm.score(test)) and again.chosen == gmm.chosen
    other = DiffPathGMM(n_components=(1, 2, 3), covariance_types=("full", "diag"), cv=4).fit(two_clusters(120, 5))
    assert not torch.allclose(other.score(test), gmm.score(test))
    assert gmm.score(test).dtype == torch.float64


def test_kde_is_the_gaussian_density_of_the_training_statistic():
    train, test = two_clusters(50, 0).abs(), two_clusters(7, 3).abs()
    kde = DiffPathKDE(bandwidth=5.0).fit(train)
    s, q, h = kde_statistic(train).numpy(), kde_statistic(test).numpy(), 5.0
    assert np.allclose(q, np.sqrt(test[:, STATISTICS.index("deps_dt_sq")].numpy()))
    density = np.exp(-((q[:, None] - s[None]) ** 2) / (2 * h * h)).mean(1) / np.sqrt(2 * np.pi * h * h)
    np.testing.assert_allclose(kde.score(test).numpy(), -np.log(density), rtol=1e-9)
    assert torch.equal(DiffPathKDE(5.0).fit(train).score(test), kde.score(test))


def test_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="not fitted"):
        DiffPathGMM().score(torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="fewer than 100 mixture components"):
        DiffPathGMM().fit(two_clusters(60, 0))
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        DiffPathKDE().fit(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        DiffPathKDE().fit(torch.full((4, 6), float("nan")))


def test_trained_digits_model_separates_digits_from_noise_and_constant_images(benchmark):
    """The trained 16 x 16 digits model: a GMM on 40 training digits' statistics ranks held-out digits below
    noise and constant images."""
    from diffguard_pl.models import load_diffusion

    diffusion = load_diffusion("checkpoints/digits/diffusion_uncond")
    train = path_statistics(diffusion, benchmark.train.images[:40])
    ind = path_statistics(diffusion, benchmark.val.images[:6])
    ood = {name: path_statistics(diffusion, benchmark.ood[name].test.images[:6]) for name in ("noise", "constant")}
    gmm = DiffPathGMM(n_components=(1, 2), cv=4).fit(train)
    for name, stats in ood.items():
        assert gmm.score(stats).min() > gmm.score(ind).max(), name
