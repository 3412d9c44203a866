"""The classifier-free path: classifier-free guidance, Grad-CAM / DSG masks, latent models (UNet and DiT) on real
small tensors."""

import subprocess
import sys

import pytest
import torch

from diffguard_pl.method.cam import cam_layer_name, dsg_mask, grad_cam
from diffguard_pl.config import AESConfig, DiffGuardConfig, GuidanceConfig
from diffguard_pl.method.ddim import ddim_step, spaced_timesteps
from diffguard_pl.method.guidance import classifier_free_eps
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.models.classifier import create_timm_model
from diffguard_pl.method.oracle import Oracle
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.method.scores import psnr

from helpers.configs import classifier_free_config, eval_argv
from helpers.models import small_classifier, small_diffusion
from helpers.paths import CHECKPOINTS, ROOT


def test_classifier_free_eps_combines_the_branches():
    # float64 and a fixed generator: the equation is checked to rounding, whatever ran before this test
    generator = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64, generator=generator)
    assert torch.equal(classifier_free_eps(eps_c, eps_u, 1.0), eps_c)
    assert torch.equal(classifier_free_eps(eps_c, eps_u, 0.0), eps_u)
    torch.testing.assert_close(classifier_free_eps(eps_c, eps_u, 10.0), eps_u + 10 * (eps_c - eps_u),
                               rtol=1e-12, atol=1e-12)
    mask = (torch.rand(2, 1, 4, 4, generator=generator) > 0.5).double()
    mixed = classifier_free_eps(eps_c, eps_u, 10.0, mask)
    inside = mask.bool().expand_as(mixed)
    assert torch.equal(mixed[inside], classifier_free_eps(eps_c, eps_u, 10.0)[inside])
    assert torch.equal(mixed[~inside], eps_u[~inside])


def test_classifier_free_with_omega_one_is_conditional_ddim():
    """omega = 1 without DSG: synthesis equals a DDIM loop on the conditional eps alone."""
    diffusion = small_diffusion(conditional=True)
    diffusion.unet.double()
    pipe = DiffGuardPipeline(diffusion, small_classifier().double(), classifier_free_config(omega=1.0, dsg=False))
    latent, labels = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 3, 5])
    synthesis, _ = pipe.synthesize(latent, labels, ["a", "b", "c"], with_reference=False)
    steps = torch.cat([torch.tensor([-1]), spaced_timesteps(1000, 8)[:4]])
    alphas = torch.cat([torch.ones(1, dtype=torch.float64), diffusion.alphas_cumprod])[steps + 1]
    x = latent
    with torch.no_grad():
        for k in range(4, 0, -1):
            t = torch.full((3,), int(steps[k]))
            eps = diffusion.eps(x, t, labels)
            x = ddim_step(x, eps, alphas[k].expand(3), alphas[k - 1].expand(3))
    assert torch.allclose(synthesis, ((x + 1) / 2).clamp(0, 1), rtol=1e-9, atol=1e-10)


def test_dsg_mask_selects_the_branch_per_pixel():
    """With a hand-made mask: guided eps inside, unconditional eps outside, at every synthesis step."""
    diffusion = load_diffusion(CHECKPOINTS / "diffusion_cond")  # trained: its eps depends on the class
    diffusion.unet.double()
    config = classifier_free_config(omega=4.0, num_steps=4, depth=2)
    pipe = DiffGuardPipeline(diffusion, small_classifier().double(), config)
    latent, labels = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([1, 4])
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    mask[0, :, :8] = 1
    mask[1, :, :, 5:11] = 1
    synthesis, _ = pipe.synthesize(latent, labels, ["a", "b"], with_reference=False, masks=mask)
    steps = torch.tensor([-1, 0, 250])
    alphas = torch.cat([torch.ones(1, dtype=torch.float64), diffusion.alphas_cumprod])[steps + 1]
    x, unguided = latent, latent
    with torch.no_grad():
        for k in (2, 1):
            t = torch.full((2,), int(steps[k]))
            eps_c, eps_u = diffusion.eps(x, t, labels), diffusion.eps(x, t, None)
            eps = torch.where(mask.bool(), eps_u + 4.0 * (eps_c - eps_u), eps_u)
            x = ddim_step(x, eps, alphas[k].expand(2), alphas[k - 1].expand(2))
            unguided = ddim_step(unguided, diffusion.eps(unguided, t, None), alphas[k].expand(2),
                                 alphas[k - 1].expand(2))
    assert torch.allclose(synthesis, ((x + 1) / 2).clamp(0, 1), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(synthesis, ((unguided + 1) / 2).clamp(0, 1), atol=1e-3)  # the guidance did something


def test_grad_cam_matches_a_manual_computation_and_leaves_no_hooks():
    classifier = small_classifier(2)
    images, labels = torch.rand(3, 1, 16, 16), torch.tensor([0, 2, 5])
    cam = grad_cam(classifier, images, labels)
    model = classifier.model
    assert cam_layer_name(model, None) == "stages.2"
    assert all(not m._forward_hooks for m in model.modules())
    act = model.stages(model.stem(classifier.prepare(images))).detach().requires_grad_(True)
    logits = model.forward_head(torch.relu(model.norm(act)))
    (grad,) = torch.autograd.grad(logits.gather(1, labels.view(-1, 1)).sum(), act)
    manual = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True)).detach()
    manual = torch.nn.functional.interpolate(manual, size=(16, 16), mode="bilinear", align_corners=False)
    low, high = manual.amin(dim=(2, 3), keepdim=True), manual.amax(dim=(2, 3), keepdim=True)
    assert torch.allclose(cam, (manual - low) / (high - low).clamp_min(1e-7), atol=1e-5)
    assert cam.shape == (3, 1, 16, 16) and cam.min() >= 0 and cam.max() <= 1
    with pytest.raises(RuntimeError):
        grad_cam(classifier, images, torch.tensor([0, 1, 99]))  # bad label: the hook must still go
    assert all(not m._forward_hooks for m in model.modules())


def test_cam_layer_defaults_to_the_last_stage_of_timm_models():
    resnet = create_timm_model("resnet18", num_classes=10, in_chans=3)
    assert cam_layer_name(resnet, None) == "layer4"
    with pytest.raises(ValueError, match="cam_layer"):
        from diffguard_pl.method.cam import _module
        _module(resnet, "layer9")


def test_dsg_mask_is_thresholded_and_resized_nearest():
    cam = torch.zeros(1, 1, 16, 16)
    cam[..., :8, :] = 0.5
    cam[..., :4, :4] = 0.2
    mask = dsg_mask(cam, 0.3, 8)
    assert mask.shape == (1, 1, 8, 8)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, :4].sum() == 32 - 4 and mask[0, 0, 4:].sum() == 0


@pytest.mark.exactness
def test_classifier_free_masks_and_scores_do_not_depend_on_the_batch():
    diffusion = small_diffusion(conditional=True)
    diffusion.unet.double()
    cfg = classifier_free_config(omega=5.0, reference="unguided", aes=AESConfig(enabled=True, psnr=20.0, min_depth=1))
    pipe = DiffGuardPipeline(diffusion, small_classifier().double(), cfg)
    images, ids = torch.rand(5, 1, 16, 16, dtype=torch.float64), [f"id{i}" for i in range(5)]
    order = [3, 0, 4, 1, 2]
    batch = pipe(images[order], [ids[i] for i in order])
    alone = pipe(images[1:2], [ids[1]])
    position = order.index(1)
    assert torch.equal(batch["masks"][position], alone["masks"][0])
    assert 0 < alone["masks"].sum() < 256  # a real, partial mask
    for name, value in alone["scores"].items():
        assert torch.allclose(batch["scores"][name][position], value[0], rtol=1e-6, atol=1e-9), name
    assert batch["unet_evals"][position] == alone["unet_evals"][0] == 4 * alone["depth"][0]  # 1 + 2 + 1 per level


def test_classifier_free_oracle_uses_the_oracle_label_and_its_mask():
    diffusion = small_diffusion(conditional=True)
    pipe = DiffGuardPipeline(diffusion, small_classifier(), classifier_free_config(omega=5.0))
    images, ids = torch.rand(3, 1, 16, 16), ["a", "b", "c"]
    pred = pipe(images, ids)["pred"]
    oracle = torch.stack([pred[0], (pred[1] + 1) % 6, torch.tensor(-1)])
    out = pipe(images, ids, {"ind": Oracle(oracle)})
    out["oracle_scores"] = out["oracle_scores"]["ind"]
    assert out["oracle_scores"]["l2"][0] == out["scores"]["l2"][0]
    assert out["oracle_scores"]["l2"][2] == out["scores"]["l2"][2]
    latent = pipe.invert(images[1:2], ids[1:2])["latent"]
    masks = pipe.dsg_masks(images[1:2], oracle[1:2])
    forced, _ = pipe.synthesize(latent, oracle[1:2], ids[1:2], False, masks=masks)
    l2 = forced.sub(images[1:2]).pow(2).mean()
    assert torch.allclose(out["oracle_scores"]["l2"][1], l2, rtol=1e-4)
    assert out["unet_evals"].tolist() == [12, 20, 12]  # 3 per level, +2 per level re-synthesised


def test_classifier_free_needs_a_conditional_model_with_a_null_class():
    with pytest.raises(ValueError, match="class-conditional"):
        DiffGuardPipeline(small_diffusion(conditional=False), small_classifier(), classifier_free_config())


def test_latent_models_load_through_from_pretrained(latent_stack):
    unet_kl, dit_vq = load_diffusion(latent_stack / "unet_kl"), load_diffusion(latent_stack / "dit_vq")
    assert type(unet_kl.unet).__name__ == "UNet2DModel" and type(unet_kl.vae).__name__ == "AutoencoderKL"
    assert type(dit_vq.unet).__name__ == "DiTTransformer2DModel" and type(dit_vq.vae).__name__ == "VQModel"
    for model in (unet_kl, dit_vq):
        assert model.latent and model.image_size == 16 and model.sample_size == 8 and model.image_channels == 1
        assert model.num_classes == 6 and model.null_class == 6
    assert unet_kl.vae.config.scaling_factor != 1.0  # fitted to unit-variance latents, and honoured
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    z = unet_kl.encode(images)
    raw = unet_kl.vae.encode(images).latent_dist.mode()
    assert torch.allclose(z, raw * unet_kl.vae.config.scaling_factor)


def test_dit_learned_sigma_is_handled(latent_stack):
    model = load_diffusion(latent_stack / "dit_vq")
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 5, 6])
    raw = model.unet(x, t, class_labels=y).sample
    assert raw.shape[1] == 4
    assert torch.equal(model.eps(x, t, y), raw[:, :2])
    assert torch.equal(model.eps(x, t), model.eps(x, t, torch.full((3,), 6)))  # None = the null class


@pytest.mark.parametrize("name", ["unet_kl", "dit_vq"])
def test_latent_pipeline_runs_classifier_free_with_dsg(latent_stack, benchmark, name):
    classifier = load_classifier(CHECKPOINTS / "classifier")
    pipe = DiffGuardPipeline(load_diffusion(latent_stack / name), classifier,
                             classifier_free_config(omega=3.0, num_steps=10, depth=5, reference="unguided"))
    images = benchmark.test.images[:4]
    out = pipe(images, benchmark.test.ids[:4])
    assert out["synthesis"].shape == images.shape and out["masks"].shape == (4, 1, 8, 8)
    assert all(torch.isfinite(v).all() for v in out["scores"].values())
    assert out["unet_evals"].tolist() == [20] * 4


def test_latent_round_trip_stays_close_for_ind_images(latent_stack, benchmark):
    model = load_diffusion(latent_stack / "unet_kl")
    pipe = DiffGuardPipeline(model, load_classifier(CHECKPOINTS / "classifier"),
                             DiffGuardConfig(num_steps=20, depth=10, guidance=GuidanceConfig(scale=0.0)))
    images = benchmark.test.images[:16]
    z = model.encode(images * 2 - 1)
    inverted = pipe.invert(images, benchmark.test.ids[:16])
    assert not torch.allclose(inverted["latent"], z, atol=0.1)  # it really went somewhere
    reconstruction, _ = pipe.synthesize(inverted["latent"], torch.zeros(16, dtype=torch.long),
                                        benchmark.test.ids[:16], with_reference=False)
    autoencoded = pipe.to_images(z)
    through_diffusion = reconstruction  # decoded: images in [0, 1]
    assert psnr(through_diffusion, autoencoded).mean() > 35  # the DDIM round trip in latent space
    assert psnr(through_diffusion, images).mean() > psnr(autoencoded, images).mean() - 1.0
    assert psnr(autoencoded, images).mean() > 25  # the autoencoder itself is fitted


@pytest.mark.subprocess
def test_evaluate_cli_runs_a_latent_classifier_free_model(tmp_path, latent_stack):
    argv = eval_argv(tmp_path, CHECKPOINTS, f"models.diffusion={latent_stack / 'unet_kl'}",
                     "diffguard.guidance.mode=classifier_free", "diffguard.guidance.classifier_free.omega=3",
                     "limit_per_set=3",
                     "callbacks.curves=false", "callbacks.score_plots=false")
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *argv], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "results.json").is_file()
