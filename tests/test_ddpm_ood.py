"""DDPM-OOD: reconstruction errors from several start levels, z-scored against InD validation errors."""

import pytest
import torch

from diffguard_pl.method.ddpm_ood import SALT, DDPMOODScore, authors_levels, reconstruction_errors, unet_evals
from diffguard_pl.models import load_diffusion
from diffguard_pl.seeding import sample_seed

from helpers.models import ALPHAS, small_diffusion
from helpers.paths import CHECKPOINTS

STEPS, LEVELS = 8, [2, 5, 7]


def float64_diffusion():
    diffusion = small_diffusion()
    diffusion.unet.double()
    return diffusion


def images(n, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n, 1, 16, 16, dtype=torch.float64)


def projection(x):
    """A fixed feature map [N, 1, 16, 16] -> [N, 5] standing in for a classifier's penultimate features."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 5, generator=g, dtype=torch.float64)
    return torch.tanh(x.flatten(1).to(torch.float64) @ w)


@torch.no_grad()
def direct_errors(diffusion, image, sample_id, level):
    """One sample from one start level, from the paper's equations: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with
    eps from the sample's generator, then DDIM (eta = 0) steps x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat
    with x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t), down the spaced timesteps 0, s, 2 s, ..."""
    stride = 1000 // STEPS
    alpha = lambda k: 1.0 if k == 0 else float(ALPHAS[(k - 1) * stride])  # level k: timestep (k - 1) * stride
    g = torch.Generator().manual_seed(sample_seed(f"{sample_id}@{level}", SALT))
    eps = torch.randn(1, 1, 16, 16, generator=g, dtype=torch.float64)
    x0 = image[None] * 2 - 1
    x = alpha(level) ** 0.5 * x0 + (1 - alpha(level)) ** 0.5 * eps
    for k in range(level, 0, -1):
        e = diffusion.eps(x, torch.tensor([(k - 1) * stride]))
        x0_hat = (x - (1 - alpha(k)) ** 0.5 * e) / alpha(k) ** 0.5
        x = alpha(k - 1) ** 0.5 * x0_hat + (1 - alpha(k - 1)) ** 0.5 * e
    recon = ((x + 1) / 2).clamp(0, 1)
    mse = float((recon - image[None]).square().mean())
    a, b = projection(image[None])[0], projection(recon)[0]
    return mse, float(1 - torch.dot(a, b) / (a.norm() * b.norm()))


def test_batched_walk_equals_a_per_sample_loop_of_the_equations():
    diffusion, x = float64_diffusion(), images(3)
    ids = ["a", "b", "c"]
    errors = reconstruction_errors(diffusion, x, ids, LEVELS, STEPS, features=projection)
    assert errors["mse"].shape == errors["feature"].shape == (3, 3) and errors["mse"].dtype == torch.float64
    for i in range(3):
        for j, level in enumerate(LEVELS):
            mse, feature = direct_errors(diffusion, x[i], ids[i], level)
            assert errors["mse"][i, j].item() == pytest.approx(mse, rel=1e-9, abs=1e-15)
            assert errors["feature"][i, j].item() == pytest.approx(feature, rel=1e-9, abs=1e-12)
    assert len(set(errors["mse"][0].tolist())) == 3  # the levels really differ


def test_scores_do_not_depend_on_batch_or_order_but_on_ids():
    diffusion, x = float64_diffusion(), images(6, seed=1)
    ids = [f"s{i}" for i in range(6)]
    fit = DDPMOODScore().fit(reconstruction_errors(diffusion, images(5, seed=2), list("vwxyz"), LEVELS, STEPS))
    batch = fit.score(reconstruction_errors(diffusion, x, ids, LEVELS, STEPS))
    alone = torch.cat([fit.score(reconstruction_errors(diffusion, x[i : i + 1], ids[i : i + 1], LEVELS, STEPS))
                       for i in range(6)])
    order = [4, 1, 5, 0, 3, 2]
    shuffled = fit.score(reconstruction_errors(diffusion, x[order], [ids[i] for i in order], LEVELS, STEPS))
    assert torch.allclose(alone, batch, rtol=1e-9, atol=1e-12)
    assert torch.allclose(shuffled, batch[order], rtol=1e-9, atol=1e-12)
    renamed = fit.score(reconstruction_errors(diffusion, x, [f"t{i}" for i in range(6)], LEVELS, STEPS))
    assert ((renamed - batch).abs() > 1e-6).all()  # the noise is drawn per id
    other_seed = fit.score(reconstruction_errors(diffusion, x, ids, LEVELS, STEPS, seed=1))
    assert ((other_seed - batch).abs() > 1e-6).all()


def test_a_level_draws_the_same_noise_whatever_other_levels_are_asked_for():
    diffusion, x = float64_diffusion(), images(2)
    both = reconstruction_errors(diffusion, x, ["a", "b"], [3, 6], STEPS)["mse"]
    one = reconstruction_errors(diffusion, x, ["a", "b"], [6], STEPS)["mse"]
    assert torch.allclose(both[:, 1:], one, rtol=1e-9, atol=1e-15)


def test_fit_uses_only_its_data_and_is_deterministic():
    errors = {"mse": torch.tensor([[1.0, 10.0], [3.0, 14.0], [5.0, 12.0]], dtype=torch.float64),
              "feature": torch.tensor([[0.1, 0.2], [0.3, 0.2], [0.2, 0.5]], dtype=torch.float64)}
    fit = DDPMOODScore().fit(errors)
    assert fit.mean["mse"].tolist() == [3.0, 12.0] and fit.std["mse"].tolist() == [2.0, 2.0]  # ddof = 1
    query = {"mse": torch.tensor([[5.0, 16.0]]), "feature": torch.tensor([[0.2, 0.3]])}
    z_feature = (query["feature"] - errors["feature"].mean(0)) / errors["feature"].std(0)
    want = ((torch.tensor([[1.0, 2.0]], dtype=torch.float64) + z_feature).mean(1))  # sum over kinds, mean levels
    assert torch.allclose(fit.score(query), want, rtol=1e-12)
    again = DDPMOODScore().fit({k: v.clone() for k, v in errors.items()})
    assert torch.equal(again.score(query), fit.score(query))
    assert torch.equal(fit.score(errors), DDPMOODScore().fit(errors).score(errors))  # scoring fits nothing
    moved = DDPMOODScore().fit({k: v + 1 for k, v in errors.items()})
    assert not torch.allclose(moved.score(query), fit.score(query))  # the fit is of the data handed to it


def test_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="not fitted"):
        DDPMOODScore().score({"mse": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="zero spread"):
        DDPMOODScore().fit({"mse": torch.ones(3, 2)})
    fit = DDPMOODScore().fit({"mse": torch.rand(4, 2)})
    with pytest.raises(ValueError, match="kinds"):
        fit.score({"mse": torch.rand(1, 2), "feature": torch.rand(1, 2)})
    with pytest.raises(ValueError, match="outside"):
        unet_evals([0, 3], STEPS)
    with pytest.raises(ValueError, match="ids"):
        reconstruction_errors(small_diffusion(), torch.rand(2, 1, 16, 16), ["a"], [1], STEPS)


def test_cost_and_the_authors_levels():
    assert unet_evals([2, 5, 7], 8) == 14  # a start at level k walks k steps
    assert authors_levels(100, 16) == [2, 18, 34, 50, 66, 82, 98]  # their t = 10, 170, ..., 970
    assert len(authors_levels(100, 4)) == 25 and len(authors_levels(100, 1)) == 99  # their [1::skip] of 100


def test_trained_digits_model_scores_noise_above_ind_digits(benchmark):
    """Measured (8 steps, levels 2, 5, 8; fit on 8 validation digits): 4 InD test digits score -1.3 to 1.7,
    4 uniform-noise images 13.6 to 17.1 (4 constant images 0.3 to 15.4, 4 digits 6-9 -0.4 to 4.2)."""
    diffusion = load_diffusion(CHECKPOINTS / "diffusion_uncond")
    levels, steps = [2, 5, 8], 8
    val, test, noise = benchmark.val, benchmark.test, benchmark.ood["noise"].test

    def errors(split, rows):
        return reconstruction_errors(diffusion, split.images[rows], list(split.ids[rows]), levels, steps)

    fit = DDPMOODScore().fit(errors(val, slice(0, 8)))
    ind, ood = fit.score(errors(test, slice(0, 4))), fit.score(errors(noise, slice(0, 4)))
    assert ind.max() < ood.min(), (ind, ood)


def test_a_latent_model_noises_and_walks_its_latents_and_errs_on_decoded_images():
    from diffguard_pl.config import DiffusionConfig
    from diffguard_pl.models import DiffusionModel, build_unet
    from diffguard_pl.models.builders import tiny_autoencoder

    torch.manual_seed(0)
    cfg = DiffusionConfig(block_out_channels=[32, 32], attention_levels=[False, True], layers_per_block=1)
    diffusion = DiffusionModel(build_unet(cfg, 2, 8, None).eval(), ALPHAS, vae=tiny_autoencoder(kind="kl").eval())
    x = images(3).float()
    errors = reconstruction_errors(diffusion, x, ["a", "b", "c"], [1, 4], STEPS, features=projection)
    assert errors["mse"].shape == errors["feature"].shape == (3, 2)
    assert torch.isfinite(errors["mse"]).all() and (errors["mse"] > 0).all()
    alone = reconstruction_errors(diffusion, x[1:2], ["b"], [1, 4], STEPS)["mse"]
    assert torch.allclose(alone, errors["mse"][1:2], rtol=1e-4)  # float32: batch-size rounding only
