"""Properties of the DiffGuard maths on small real tensors (random small models, hand-made eps models)."""

import pytest
import torch

from diffguard_pl.config import AESConfig, CutoutConfig, DiffGuardConfig, GuidanceConfig
from diffguard_pl.method.ddim import spaced_timesteps, step_coefficients
from diffguard_pl.method.guidance import clean_estimate, cutout, cutout_params, guided_eps, log_prob_grad
from diffguard_pl.models import DiffusionModel
from diffguard_pl.method.oracle import Oracle
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.method.walk import Rows

from helpers.models import ALPHAS, RecordingUNet, small_classifier, small_diffusion


def unguided(num_steps=10, depth=6, **kw):
    return DiffGuardConfig(num_steps=num_steps, depth=depth, guidance=GuidanceConfig(scale=0.0), **kw)


def test_synthesis_starts_where_inversion_stopped():
    images = torch.rand(3, 1, 16, 16)
    unet = RecordingUNet(torch.randn(3, 1, 16, 16))
    pipe = DiffGuardPipeline(DiffusionModel(unet, ALPHAS), small_classifier(), unguided(num_steps=10, depth=6))
    latent = pipe.invert(images, ["a", "b", "c"])["latent"]
    inversion_calls = list(unet.calls)
    pipe.synthesize(latent, torch.zeros(3, dtype=torch.long), ["a", "b", "c"], with_reference=False)
    synthesis_calls = unet.calls[len(inversion_calls):]
    steps = spaced_timesteps(1000, 10)[:6].tolist()
    assert [int(t[0]) for t, _ in inversion_calls] == steps
    assert [int(t[0]) for t, _ in synthesis_calls] == steps[::-1]
    first_t, first_x = synthesis_calls[0]
    assert torch.equal(first_x, latent)  # no extra step between inversion and synthesis
    # The latent sits exactly at level t_{depth-1}: with a constant eps, x = sqrt(a) x0 + sqrt(1-a) eps.
    a = ALPHAS[steps[-1]].float()
    assert torch.allclose(latent, a.sqrt() * (images * 2 - 1) + (1 - a).sqrt() * unet.fixed, atol=1e-5)


def test_round_trip_is_exact_for_a_consistent_eps_model():
    images = torch.rand(4, 1, 16, 16)
    unet = RecordingUNet(torch.randn(4, 1, 16, 16))
    pipe = DiffGuardPipeline(DiffusionModel(unet, ALPHAS), small_classifier(), unguided(num_steps=20, depth=15))
    out = pipe(images, [f"s{i}" for i in range(4)])
    assert torch.allclose(out["synthesis"], images, atol=1e-4)
    assert out["scores"]["l2"].max() < 1e-8
    assert out["unet_evals"].tolist() == [30] * 4 and out["depth"].tolist() == [15] * 4


def test_a_dry_run_pipeline_counts_its_work_but_cannot_run():
    pipe = DiffGuardPipeline(small_diffusion(), small_classifier(), unguided(num_steps=10, depth=6), dry_run=True)
    assert pipe.unet_evals(6) == 12  # six inversion steps, six synthesis steps of one row
    with pytest.raises(RuntimeError, match="built with dry_run=True and cannot run"):
        pipe(torch.rand(1, 1, 16, 16))


def test_unguided_reference_runs_in_the_same_batch():
    images = torch.rand(2, 1, 16, 16)
    unet = RecordingUNet(torch.randn(4, 1, 16, 16))
    pipe = DiffGuardPipeline(DiffusionModel(unet, ALPHAS), small_classifier(),
                             unguided(num_steps=10, depth=4, reference="unguided"))
    out = pipe(images, ["a", "b"])
    assert [x.shape[0] for _, x in unet.calls] == [2] * 4 + [4] * 4  # inversion N, synthesis 2N
    assert out["unet_evals"].tolist() == [12, 12]


@pytest.mark.parametrize("clean", ["x0_pred", "blend"])
def test_guidance_raises_log_probability_of_the_label(clean):
    torch.manual_seed(1)
    classifier = small_classifier(1)
    x0 = torch.rand(5, 1, 16, 16) * 2 - 1
    a_t = torch.full((5,), 0.6, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = a_t.sqrt().float().view(-1, 1, 1, 1) * x0 + (1 - a_t).sqrt().float().view(-1, 1, 1, 1) * eps
    labels = torch.tensor([0, 1, 2, 3, 4])

    def log_p(e):
        x_clean = clean_estimate(x_t, e, a_t, clean)
        return torch.log_softmax(classifier((x_clean + 1) / 2), 1).gather(1, labels.view(-1, 1)).flatten()

    cfg = GuidanceConfig(scale=0.5, clean=clean, cutout=CutoutConfig(num=0))
    with torch.no_grad():
        before = log_p(eps)
    guided = guided_eps(eps, x_t, a_t, labels, classifier, cfg)
    after = log_p(guided).detach()
    assert (after > before).all()
    # With the coefficients precomputed (the pipeline's per-run table) the result is the same to the bit.
    assert torch.equal(guided_eps(eps, x_t, None, labels, classifier, cfg, coef_t=step_coefficients(a_t, x_t)), guided)


def test_guidance_gradient_is_per_sample_and_skips_the_unet():
    classifier = small_classifier()
    x = torch.randn(4, 1, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    params = cutout_params(["a", "b", "c", "d"], 1, CutoutConfig(num=3))[:, 0]
    together = log_prob_grad(classifier, x, labels, params)
    alone = torch.cat([log_prob_grad(classifier, x[i : i + 1], labels[i : i + 1], params[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-6)
    assert not x.requires_grad


def test_cutout_params_depend_only_on_id():
    cfg = CutoutConfig(num=4, min_frac=0.5, max_frac=0.9)
    a = cutout_params(["x", "y", "z"], 5, cfg, seed=3)
    b = cutout_params(["z", "x"], 5, cfg, seed=3)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    side = a[..., 0]
    assert side.min() >= 0.5 and side.max() <= 0.9
    assert ((a[..., 1] + side) <= 1 + 1e-12).all() and ((a[..., 2] + side) <= 1 + 1e-12).all()
    assert not torch.equal(cutout_params(["x"], 5, cfg, seed=4), a[:1])


def test_cutout_crops_the_requested_square():
    images = torch.rand(2, 1, 16, 16)
    full = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]], dtype=torch.float64)
    assert torch.allclose(cutout(images, full, 16), images, atol=1e-6)
    quarter = torch.tensor([[[0.5, 0.5, 0.0]], [[0.5, 0.0, 0.5]]], dtype=torch.float64)  # top-right, bottom-left
    crops = cutout(images, quarter, 8)
    assert torch.allclose(crops[0], images[0, :, :8, 8:], atol=1e-6)
    assert torch.allclose(crops[1], images[1, :, 8:, :8], atol=1e-6)


@pytest.mark.exactness
@pytest.mark.parametrize("conditional, released", [(False, False), (True, False), (False, True)])
def test_scores_do_not_depend_on_the_batch(conditional, released):
    diffusion, classifier = small_diffusion(conditional), small_classifier()
    recipe = dict(ladder="released", clip_x0="both") if released else {}
    cutout = CutoutConfig(num=2, mode="released" if released else "bilinear")
    cfg = DiffGuardConfig(num_steps=8, depth=4, reference="unguided", **recipe,
                          guidance=GuidanceConfig(scale=3.0, cutout=cutout))
    pipe = DiffGuardPipeline(diffusion, classifier, cfg)
    images, ids = torch.rand(5, 1, 16, 16), [f"id{i}" for i in range(5)]
    order = [3, 0, 4, 1, 2]
    batch = pipe(images[order], [ids[i] for i in order])
    alone = pipe(images[1:2], [ids[1]])
    position = order.index(1)
    for name, value in alone["scores"].items():
        assert torch.allclose(batch["scores"][name][position], value[0], rtol=1e-4, atol=1e-6), name


@pytest.mark.exactness
def test_the_forced_general_path_equals_the_fast_path_bit_for_bit(monkeypatch):
    """Rows gathered and per-row coefficients (what samples at different levels need) give exactly the numbers of
    the fast path (all rows as they are, one scalar per level): float32 and float64, with clipping and AES. The
    same denoiser batches either way, so no rounding of another batch composition enters."""
    for dtype in (torch.float32, torch.float64):
        diffusion, classifier = small_diffusion(), small_classifier().to(dtype)
        diffusion.unet.to(dtype)
        cfg = DiffGuardConfig(num_steps=8, depth=5, reference="unguided", clip_x0="both",
                              aes=AESConfig(enabled=True, psnr=21.0, min_depth=2),
                              guidance=GuidanceConfig(scale=3.0, cutout=CutoutConfig(num=2)))
        images = torch.cat([torch.rand(3, 1, 16, 16), torch.full((2, 1, 16, 16), 0.5)]).to(dtype)
        pipe = DiffGuardPipeline(diffusion, classifier, cfg)
        fast = pipe(images, list("abcde"))
        as_found = pipe.walker._rows

        def gathered(walk, phase):  # the same rows in the general form: device indices and per-row levels
            rows = as_found(walk, phase)
            return None if rows is None else Rows(rows.cpu, rows.cpu.to(pipe.device),
                                                  walk.level[rows.cpu].to(pipe.device))

        monkeypatch.setattr(pipe.walker, "_rows", gathered)
        forced = pipe(images, list("abcde"))
        assert torch.equal(fast["depth"], forced["depth"]) and len(set(fast["depth"].tolist())) > 1
        for name in fast["scores"]:
            assert torch.equal(fast["scores"][name], forced["scores"][name]), (dtype, name)
        assert torch.equal(fast["synthesis"], forced["synthesis"]) and torch.equal(fast["reference"], forced["reference"])


def test_synthesis_pred_is_the_classifier_on_the_synthesis():
    diffusion, classifier = small_diffusion(), small_classifier()
    cfg = DiffGuardConfig(num_steps=6, depth=3, distances=["l2"],
                          guidance=GuidanceConfig(scale=3.0, cutout=CutoutConfig(num=0)))
    out = DiffGuardPipeline(diffusion, classifier, cfg)(torch.rand(4, 1, 16, 16), list("abcd"))
    with torch.no_grad():
        expected = classifier(out["synthesis"]).argmax(dim=1)
    assert out["synthesis_pred"].tolist() == expected.tolist()


def test_oracle_only_redoes_samples_whose_label_differs():
    diffusion, classifier = small_diffusion(), small_classifier()
    cfg = DiffGuardConfig(num_steps=6, depth=3, guidance=GuidanceConfig(scale=3.0, cutout=CutoutConfig(num=0)))
    pipe = DiffGuardPipeline(diffusion, classifier, cfg)
    images, ids = torch.rand(4, 1, 16, 16), ["a", "b", "c", "d"]
    pred = pipe(images, ids)["pred"]
    oracle_labels = torch.stack([pred[0], (pred[1] + 1) % 6, torch.tensor(-1), (pred[3] + 2) % 6])
    out = pipe(images, ids, {"ind": Oracle(oracle_labels)})
    oracle = out["oracle_scores"]["ind"]
    for name in out["scores"]:
        assert oracle[name][0] == out["scores"][name][0]
        assert oracle[name][2] == out["scores"][name][2]  # OOD: keeps the prediction
    assert out["unet_evals"].tolist() == [6, 9, 6, 9]
    # The oracle score is the score of guiding by the oracle label directly.
    forced = pipe.synthesize(pipe.invert(images[1:2], ids[1:2])["latent"], oracle_labels[1:2], ids[1:2], False)[0]
    l2 = forced.sub(images[1:2]).pow(2).mean()
    assert torch.allclose(oracle["l2"][1], l2, rtol=1e-4)


def test_bad_inputs_fail_clearly():
    pipe = DiffGuardPipeline(small_diffusion(), small_classifier(), unguided(num_steps=4, depth=2))
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        pipe(torch.rand(2, 3, 16, 16), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        pipe(torch.rand(2, 1, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(torch.rand(2, 1, 16, 16) * 2 - 1, ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        pipe(torch.full((1, 1, 16, 16), float("nan")), ["a"])
    nan_model = DiffusionModel(RecordingUNet(torch.full((2, 1, 16, 16), float("nan"))), ALPHAS)
    with pytest.raises(FloatingPointError, match="NaN"):
        DiffGuardPipeline(nan_model, small_classifier(), unguided(num_steps=4, depth=2))(torch.rand(2, 1, 16, 16), ["a", "b"])


def test_missing_perceptual_weights_name_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = DiffGuardConfig(distances=["l2", "dists"], score="l2")
    with pytest.raises(FileNotFoundError) as info:
        DiffGuardPipeline(small_diffusion(), small_classifier(), cfg)
    assert "dists_weights.pt" in str(info.value) and str(tmp_path) in str(info.value)


def test_crop_maps_give_the_crops_of_their_parameters():
    from diffguard_pl.method.guidance import crop_affine

    images = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    params = cutout_params(["a", "b", "c"], 4, CutoutConfig(num=5))  # [3, 4 steps, 5 crops, 3]
    maps = crop_affine(params)
    assert maps.shape == (3, 4, 5, 2, 3)
    for step in range(4):
        assert torch.equal(cutout(images, params[:, step], 8), cutout(images, maps[:, step], 8))
    # Side 1/2 at (left 1/4, top 1/2): scale 1/2, centre (2 left + side - 1, 2 top + side - 1) = (0, 1/2).
    one = crop_affine(torch.tensor([[0.5, 0.25, 0.5]], dtype=torch.float64))
    assert torch.equal(one, torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.5]]], dtype=torch.float64))


class LateNaNUNet(RecordingUNet):
    """Finite eps except for the rows of one sample position from the ``bad_call``-th call on."""

    def __init__(self, eps, bad_call, bad_row):
        super().__init__(eps)
        self.bad_call, self.bad_row = bad_call, bad_row

    def forward(self, x, t, class_labels=None):
        out = super().forward(x, t, class_labels).sample.clone()
        if len(self.calls) > self.bad_call:
            out[self.bad_row] = float("nan")
        return type("Out", (), {"sample": out})()


@pytest.mark.parametrize("aes", [False, True])
def test_nan_appearing_mid_run_fails_the_batch(aes):
    """The denoiser's NaN check is read once per run (no per-step device reads), yet a NaN that appears in a
    later step, in one row, still fails the batch with the denoiser's message, in both loops."""
    images = torch.stack([torch.zeros(1, 16, 16), torch.rand(1, 16, 16)])
    eps = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg, bad_call = unguided(num_steps=10, depth=6), 4
    if aes:  # the samples stop at depths 2 and 3: from the third call on they are in different phases
        eps[0] *= 3
        eps[1] *= 0.05
        cfg, bad_call = unguided(num_steps=10, depth=6, aes=AESConfig(enabled=True, psnr=20.0, min_depth=1)), 2
    finite = DiffGuardPipeline(DiffusionModel(RecordingUNet(eps), ALPHAS), small_classifier(), cfg)(images, ["a", "b"])
    assert torch.isfinite(finite["scores"]["l2"]).all()
    if aes:
        assert finite["depth"].tolist() == [2, 3]
    unet = LateNaNUNet(eps, bad_call=bad_call, bad_row=0)
    with pytest.raises(FloatingPointError, match="diffusion model returned NaN"):
        DiffGuardPipeline(DiffusionModel(unet, ALPHAS), small_classifier(), cfg)(images, ["a", "b"])
    assert len(unet.calls) > bad_call  # the NaN came after the first calls, and the run went on to its end
