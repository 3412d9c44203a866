"""The released recipe, exactly: guided-diffusion's inversion ladder and x0 clipping order, whole-pixel cutouts,
the hand-off, and the whole ImageNet GDM loop against a guided-diffusion-style loop written from its equations."""

import csv
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffguard_pl import config as config_lib
from diffusers import DDPMScheduler

from diffguard_pl.config import ConfigError, CutoutConfig, DiffGuardConfig, DiffusionConfig, EvalConfig, GuidanceConfig
from diffguard_pl.method.ddim import Ladder
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.method.guidance import cutout_params, nearest_cutout
from diffguard_pl.models.convert import adm_scheduler
from diffguard_pl.models import DiffusionModel, build_unet, load_classifier, load_diffusion, save_diffusion
from diffguard_pl.models.diffusion import schedule_alphas_cumprod
from diffguard_pl.method.pipeline import DiffGuardPipeline

from helpers.models import ALPHAS, RecordingUNet
from helpers.paths import CHECKPOINTS, ROOT


class ToyEps(torch.nn.Module):
    """A small deterministic eps network in float64 whose output depends on x and t non-linearly."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64) * 0.6)
            self.conv.bias.fill_(0.1)
        self.config = type("Config", (), {"in_channels": 1, "sample_size": 16})()

    def forward(self, x, t, class_labels=None):
        scale = 1.0 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return type("Out", (), {"sample": torch.tanh(self.conv(x) * scale) * 1.5})()


def test_released_ladder_reaches_t900_with_eps_at_the_level_it_stands_on():
    released, symmetric = Ladder.build(ALPHAS, 100, "released"), Ladder.build(ALPHAS, 100, "symmetric")
    steps = released.steps(90)
    inversion, synthesis = steps[:90], steps[90:]
    timestep = lambda ladder, level: int(ladder.timesteps[level])  # noqa: E731
    # guided-diffusion's ddim_reverse_sample: the input is level t = 0; x_{t_i} -> x_{t_{i+1}} with eps(x_{t_i}, t_i).
    assert [(timestep(released, a), t) for a, t, _ in inversion] == [(10 * i, 10 * i) for i in range(90)]
    assert timestep(released, released.reached(90)) == 900
    assert [t for _, t, _ in synthesis] == list(range(900, -1, -10))  # 91 steps, ending at the clean level
    assert synthesis[-1][2] == 0 and float(released.alphas[0]) == 1.0
    # The symmetric ladder: the input is the clean level; the step into level k evaluates eps at t_k.
    sym = symmetric.steps(90)
    assert [(timestep(symmetric, a), t) for a, t, _ in sym[:90]] == [(-1, 0)] + [(10 * i, 10 * i + 10) for i in range(89)]
    assert timestep(symmetric, symmetric.reached(90)) == 890 and len(sym) == 180
    # The released hand-off starts synthesis one level above the latent.
    assert timestep(released, Ladder.build(ALPHAS, 100, "released", "released").synthesis_start(90)) == 910


def test_the_pipeline_walks_the_released_ladder():
    images = torch.rand(2, 1, 16, 16)
    unet = RecordingUNet(torch.randn(2, 1, 16, 16))
    cfg = DiffGuardConfig(num_steps=10, depth=6, ladder="released", guidance=GuidanceConfig(scale=0.0))
    pipe = DiffGuardPipeline(DiffusionModel(unet, ALPHAS), _classifier(torch.float32), cfg)
    out = pipe(images, ["a", "b"])
    calls = [(int(t[0]), x) for t, x in unet.calls]
    assert [t for t, _ in calls[:6]] == [0, 100, 200, 300, 400, 500]
    assert [t for t, _ in calls[6:]] == [600, 500, 400, 300, 200, 100, 0]
    assert torch.equal(calls[0][1], images * 2 - 1)  # the input itself is level t = 0
    assert out["unet_evals"].tolist() == [6 + 7, 6 + 7]
    with pytest.raises(ConfigError, match="diffguard.depth=10 must lie in"):
        DiffGuardConfig(num_steps=10, depth=10, ladder="released")


def _classifier(dtype):
    return load_classifier(CHECKPOINTS / "classifier").to(dtype).eval()


def _log_prob_grad(classifier, x_clean, labels, boxes):
    """grad of sum log p(y | crops of (x_clean + 1) / 2) by the released code's recipe: slice, F.interpolate nearest."""
    x = x_clean.detach().requires_grad_(True)
    images = (x + 1) / 2
    crops, targets = [], []
    for n in range(len(x)):
        for side, left, top in boxes[n].long().tolist():
            crop = images[n : n + 1, :, top : top + side, left : left + side]
            crops.append(F.interpolate(crop, classifier.spec.input_size))  # mode "nearest", as released
            targets.append(labels[n])
    log_probs = torch.log_softmax(classifier(torch.cat(crops)), dim=1)
    selected = log_probs.gather(1, torch.stack(targets).view(-1, 1)).sum()
    return torch.autograd.grad(selected, x)[0]


def test_one_inversion_and_guided_synthesis_by_hand_in_float64():
    """The released order, step by step from the equations: inversion with x0 clipped after its first step;
    synthesis with x0 clipped, eps re-derived, then the guidance of the unclipped clean-grad blend added, with
    whole-pixel nearest cutouts; the guided x0 not clipped again. The pipeline matches to 1e-10."""
    cutout_cfg = CutoutConfig(num=3, min_frac=0.75, max_frac=1.0, mode="released")
    cfg = DiffGuardConfig(num_steps=10, depth=3, ladder="released", clip_x0="both", distances=["l2"], score="l2",
                          guidance=GuidanceConfig(scale=3.0, clean="blend", cutout=cutout_cfg))
    classifier = _classifier(torch.float64)
    pipe = DiffGuardPipeline(DiffusionModel(ToyEps(), ALPHAS), classifier, cfg)
    ids, labels = ["a", "b", "c"], torch.tensor([0, 3, 5])
    x0 = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    run = pipe.run(x0, ids, labels, with_reference=False)

    toy = ToyEps()
    timesteps = [-1] + list(range(0, 1000, 100))  # per level; level 0 = clean
    a = [1.0] + [float(ALPHAS[t]) for t in timesteps[1:]]
    root = lambda v: torch.tensor(v, dtype=torch.float64).sqrt()  # noqa: E731
    eps_of = lambda x, level: toy(x, torch.full((len(x),), timesteps[level])).sample  # noqa: E731
    x = x0.clone()
    for k in (1, 2, 3):  # the input is treated as level 1 (t = 0); eps at the level it stands on
        eps, A = eps_of(x, k), a[k]
        if k > 1:  # clip_denoised for t > 0: clip x0, re-derive eps
            x0_pred = ((x - root(1 - A) * eps) / root(A)).clamp(-1, 1)
            eps = (x - root(A) * x0_pred) / root(1 - A)
        x = root(a[k + 1]) * (x - root(1 - A) * eps) / root(A) + root(1 - a[k + 1]) * eps
    assert (run["latent"] - x).abs().max() < 1e-10
    assert run["depth"].tolist() == [3, 3, 3]

    boxes = cutout_params(ids, 4, cutout_cfg, cfg.seed, 16)  # index level - 1
    assert ((boxes[..., 0] >= 12) & (boxes[..., 0] <= 15)).all()
    for k in (4, 3, 2, 1):  # synthesis: level k -> k - 1, eps at level k
        eps, A = eps_of(x, k), a[k]
        x0_raw = (x - root(1 - A) * eps) / root(A)
        eps_clipped = (x - root(A) * x0_raw.clamp(-1, 1)) / root(1 - A)
        x_clean = root(1 - A) * x0_raw + (1 - root(1 - A)) * x  # the released blend, of the unclipped x0
        guided = eps_clipped - 3.0 * root(1 - A) * _log_prob_grad(classifier, x_clean, labels, boxes[:, k - 1])
        x = root(a[k - 1]) * (x - root(1 - A) * guided) / root(A) + root(1 - a[k - 1]) * guided
    assert (run["synthesis"] - x).abs().max() < 1e-10


def test_nearest_cutout_equals_slicing_and_interpolate():
    images = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    cfg = CutoutConfig(num=4, min_frac=0.6, max_frac=1.0, mode="released")
    boxes = cutout_params(["x", "y"], 1, cfg, 0, 20)[:, 0]
    for size in (16, 20, 23):
        got = nearest_cutout(images, boxes, size)
        want = torch.cat([F.interpolate(images[n : n + 1, :, t : t + s, l : l + s], size)
                          for n in range(2) for s, l, t in boxes[n].long().tolist()])
        assert torch.equal(got, want), size
    # sides follow the released rule int(u * (max - min) + min): 12 .. 19 of 20, every offset where the crop fits
    many = cutout_params([str(i) for i in range(50)], 4, cfg, 0, 20)
    side, left, top = many.unbind(-1)
    assert side.min() >= 12 and side.max() <= 19 and (left + side <= 20).all() and (top + side <= 20).all()
    assert len(side.unique()) == 8 and (left == 0).any() and (left == 20 - side).any()


def _guided_diffusion_loop(model, classifier, x0, labels, timesteps, depth, scale, alphas=ALPHAS):
    """DiffGuard's GDM loop as guided-diffusion runs it with clip_denoised=True and the hand-off fixed, written
    from its code's equations in its order of arithmetic: the respaced schedule (new betas from the spaced
    alpha_bar, then their cumulative product), ``ddim_reverse_sample`` for ``depth`` steps (x0 clipped after the
    first), then ``ddim_sample`` with ``condition_score`` (the released cond_fn re-runs the model for an
    unclipped x0 and blends it), plus the unguided reconstruction. eps is re-derived from x0 wherever
    guided-diffusion re-derives it."""
    last, betas = 1.0, []
    for t in timesteps.tolist():  # SpacedDiffusion: betas of the kept timesteps, alpha_bar re-accumulated
        betas.append(1 - float(alphas[t]) / last)
        last = float(alphas[t])
    ac = torch.from_numpy(np.cumprod(1.0 - np.array(betas, dtype=np.float64))).to(x0.dtype)
    recip, recip_m1 = (1 / ac).sqrt(), (1 / ac - 1).sqrt()  # sqrt_recip(m1)_alphas_cumprod

    def eps_at(x, i):
        return model(x, torch.full((len(x),), int(timesteps[i])), None).sample

    def xstart_from_eps(x, i, eps):
        return recip[i] * x - recip_m1[i] * eps

    def eps_from_xstart(x, i, xstart):
        return (recip[i] * x - xstart) / recip_m1[i]

    x = x0
    for i in range(depth):  # ddim_reverse_sample
        pred_xstart = xstart_from_eps(x, i, eps_at(x, i))
        if i > 0:  # the released inversion clips from its second step on
            pred_xstart = pred_xstart.clamp(-1, 1)
        eps = eps_from_xstart(x, i, pred_xstart)
        x = pred_xstart * ac[i + 1].sqrt() + (1 - ac[i + 1]).sqrt() * eps

    def sample(x, guided):
        for i in range(depth, -1, -1):  # ddim_sample, eta = 0
            a = ac[i]
            a_prev = ac[i - 1] if i > 0 else torch.ones((), dtype=x.dtype)
            pred_xstart = xstart_from_eps(x, i, eps_at(x, i)).clamp(-1, 1)  # p_mean_variance
            if guided:  # condition_score with the released cond_fn
                eps = eps_from_xstart(x, i, pred_xstart)
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    unclipped = xstart_from_eps(x_in, i, eps_at(x_in, i))
                    fac = (1 - a).sqrt()
                    blend = unclipped * fac + x_in * (1 - fac)
                    blend = blend.detach().requires_grad_(True)
                    log_probs = torch.log_softmax(classifier((blend + 1) / 2), dim=-1)
                    grad = torch.autograd.grad(log_probs[range(len(x)), labels].sum(), blend)[0] * scale
                eps = eps - (1 - a).sqrt() * grad
                pred_xstart = xstart_from_eps(x, i, eps)
            eps = eps_from_xstart(x, i, pred_xstart)
            x = pred_xstart * a_prev.sqrt() + (1 - a_prev - 0.0).sqrt() * eps
        return x

    return sample(x, True), sample(x, False)


def _guided_diffusion_alphas_cumprod():
    """alpha_bar as guided-diffusion builds ADM-256's linear schedule: float64 numpy betas, numpy cumprod."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas, axis=0))


def test_a_converted_adm_schedule_is_guided_diffusions_float64_table(tmp_path):
    """The level table of a converted ADM checkpoint is guided-diffusion's, bit for bit; diffusers' own float32
    table is up to ~4e-7 away (what 90 guided steps amplify into the scores)."""
    scheduler = adm_scheduler(1000, "linear", learn_sigma=True)
    want = _guided_diffusion_alphas_cumprod()
    assert torch.equal(schedule_alphas_cumprod(scheduler), want)
    assert (scheduler.alphas_cumprod.double() - want).abs().max() > 1e-7
    # saved as a converted checkpoint folder and loaded back: the same table
    cfg = DiffusionConfig(block_out_channels=[32], attention_levels=[False], layers_per_block=1)
    save_diffusion(DiffusionModel(build_unet(cfg, 1, 16, None), want), scheduler, tmp_path / "adm")
    assert torch.equal(load_diffusion(tmp_path / "adm").alphas_cumprod, want)


def test_the_imagenet_gdm_recipe_in_float64_equals_guided_diffusion_to_1e12():
    """imagenet_gdm.yaml's walk (100 steps, released ladder to t = 900, x0 clipped both ways, scale 3, clean blend,
    unguided reference; cutouts and AES off) on a converted ADM schedule, in float64: the guided synthesis and
    the unguided reconstruction equal a guided-diffusion-style loop on guided-diffusion's own float64 table to
    1e-12. On diffusers' float32 table the same loop lands more than 1e-9 away."""
    preset = config_lib.compose(EvalConfig, [ROOT / "conf" / "imagenet_gdm.yaml"],
                                ["diffguard.guidance.cutout.num=0", "diffguard.aes.enabled=false",
                                 "diffguard.distances=[l2]", "diffguard.score=l2"])
    cfg = config_lib.to_object(preset).diffguard
    assert (cfg.num_steps, cfg.depth, cfg.ladder, cfg.clip_x0, cfg.reference) == (100, 90, "released", "both",
                                                                                   "unguided")
    classifier = _classifier(torch.float64)
    alphas = schedule_alphas_cumprod(adm_scheduler(1000, "linear", learn_sigma=True))
    pipe = DiffGuardPipeline(DiffusionModel(ToyEps(), alphas), classifier, cfg)
    x0 = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.tensor([1, 4, 2])
    run = pipe.run(x0, ["a", "b", "c"], labels, with_reference=True)
    toy = ToyEps()
    model = lambda x, t, y: toy(x, t)  # noqa: E731
    timesteps = torch.arange(100) * 10
    guided, unguided = _guided_diffusion_loop(model, classifier, x0, labels, timesteps, 90, 3.0,
                                              _guided_diffusion_alphas_cumprod())
    assert (run["synthesis"] - guided).abs().max() < 1e-12
    assert (run["reference"] - unguided).abs().max() < 1e-12
    assert (run["synthesis"] - run["reference"]).abs().max() > 1e-3  # the guidance did something
    float32_table = DDPMScheduler(beta_schedule="linear").alphas_cumprod.double()
    guided32, _ = _guided_diffusion_loop(model, classifier, x0, labels, timesteps, 90, 3.0, float32_table)
    assert (guided32 - guided).abs().max() > 1e-9


@pytest.mark.slow  # 272 denoiser calls per image in float64 (a minute or two); the maths: the by-hand test above
@pytest.mark.parametrize("precision, trained", [("64-true", False), ("64-true", True), ("32-true", True)])
def test_evaluate_runs_the_imagenet_gdm_loop_like_guided_diffusion(tmp_path, benchmark, small_models, precision,
                                                                   trained):
    """imagenet_gdm.yaml's diffguard settings (100 steps, released ladder to t = 900, clipping in both
    directions, scale 3, clean blend, unguided reference) with cutouts and AES off, run by evaluate.py on a
    small model, give the L2 scores of the guided-diffusion loop.

    float64: within 1e-6 relative (the same maths; the two differ only in the order of their arithmetic), on
    a random small model (the default suite) and on the trained digits models. float32, trained models: 90
    inversion steps towards t = 900 amplify rounding (float64 runs agree to about 2e-8 per pixel, float32 ones
    to about 1e-3), so the L2 of guided minus unguided differs by up to a few 1e-3 relative on some samples:
    median below 1e-3, every sample below 1e-2.
    """
    dtype = torch.float64 if precision == "64-true" else torch.float32
    models = CHECKPOINTS if trained else small_models
    classifier_path = models / "classifier"
    diffusion_path = models / ("diffusion_uncond" if trained else "diffusion")
    argv = [f"--config={ROOT / 'conf' / 'imagenet_gdm.yaml'}", f"output_dir={tmp_path}", "data.benchmark=digits",
            "data.root=null", "data.resolution=16", "data.channels=1", "data.preprocess=null", "data.resize=null",
            "data.allow_grayscale=false", "data.eval_batch_size=16", "data.num_workers=0",
            f"models.classifier={classifier_path}", f"models.diffusion={diffusion_path}",
            "models.classifier_arch=null", "models.classifier_input_size=null", "models.classifier_view=resize",
            "models.classifier_mean=null", "models.classifier_std=null", "baselines.train_samples=null",
            "diffguard.distances=[l2]", "diffguard.score=l2", "diffguard.guidance.cutout.num=0",
            "diffguard.aes.enabled=false", "limit_per_set=1", "trainer.accelerator=cpu", f"trainer.precision={precision}",
            "trainer.enable_progress_bar=false", "callbacks.curves=false", "callbacks.reconstructions=0",
            "callbacks.score_plots=false"]
    argv += [] if trained else ["models.allow_classifier_mismatch=true"]  # a random classifier: at chance
    cfg = config_lib.load(EvalConfig, argv, None)
    assert (cfg.diffguard.num_steps, cfg.diffguard.depth, cfg.diffguard.ladder, cfg.diffguard.clip_x0) == \
        (100, 90, "released", "both")
    evaluate(cfg, benchmark)
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    images = {i: s.images[k] for _, _, s in benchmark.all_sets() for k, i in enumerate(s.ids)}
    x0 = torch.stack([images[r["id"]] for r in rows]).to(dtype)
    classifier = load_classifier(classifier_path).to(dtype)
    diffusion = load_diffusion(diffusion_path)
    diffusion.unet.to(dtype)
    labels = torch.tensor([int(r["pred"]) for r in rows])
    with torch.no_grad():
        assert torch.equal(classifier(x0).argmax(1), labels)
    guided, unguided = _guided_diffusion_loop(lambda x, t, y: diffusion.unet(x, t), classifier, x0 * 2 - 1, labels,
                                              torch.arange(100) * 10, depth=90, scale=3.0)
    want = (((guided + 1) / 2).clamp(0, 1) - ((unguided + 1) / 2).clamp(0, 1)).pow(2).flatten(1).mean(1).detach()
    got = torch.tensor([float(r["diffguard/l2"]) for r in rows], dtype=torch.float64)
    assert len(rows) == 8 and (want > (1e-4 if trained else 1e-9)).all()
    gap = (got - want.double()).abs() / want.double()
    if dtype == torch.float64:
        assert gap.max() < 1e-6, gap
    else:
        assert gap.median() < 1e-3 and gap.max() < 1e-2, gap
