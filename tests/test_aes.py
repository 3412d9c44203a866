"""Adaptive early stop: per-sample stopping inside shared batches."""

import pytest
import torch

from diffguard_pl.config import AESConfig, ConfigError, CutoutConfig, DiffGuardConfig, GuidanceConfig
from diffguard_pl.models import DiffusionModel
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.method.scores import psnr

from helpers.configs import eval_argv
from helpers.models import ALPHAS, RecordingUNet, small_classifier, small_diffusion

STEPS = 20


class ZeroEpsUNet(RecordingUNet):
    """eps = 0: the latent at level k is sqrt(a_k) x0, and synthesis undoes it exactly."""

    def forward(self, x, t, class_labels=None):
        self.calls.append((t.clone(), x.clone()))
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def zero_eps_pipeline(depth=15, **aes):
    cfg = DiffGuardConfig(num_steps=STEPS, depth=depth, guidance=GuidanceConfig(scale=0.0),
                          aes=AESConfig(enabled=bool(aes), **aes))
    return DiffGuardPipeline(DiffusionModel(ZeroEpsUNet(torch.zeros(1, 1, 16, 16)), ALPHAS), small_classifier(), cfg)


def expected_depth(image, threshold, depth, min_depth=1):
    """Stop at the first level k whose latent sqrt(a_k) x0 falls below the PSNR threshold."""
    x0 = image * 2 - 1
    steps = torch.arange(STEPS) * (1000 // STEPS)
    for k in range(depth):
        latent = ALPHAS[steps[k]].float().sqrt() * x0
        if k + 1 >= min_depth and psnr((latent + 1) / 2, image) < threshold:
            return k + 1
    return depth


def images_of_contrast(*contrasts):
    """Images around 0.5 with the given contrast: the farther from grey, the sooner PSNR drops."""
    torch.manual_seed(0)
    base = torch.rand(len(contrasts), 1, 16, 16) - 0.5
    return 0.5 + base * torch.tensor(contrasts).view(-1, 1, 1, 1)


def test_stopping_depth_follows_the_threshold():
    images = images_of_contrast(0.05, 0.2, 0.5, 1.0)
    pipe = zero_eps_pipeline(psnr=30.0)
    out = pipe(images, ["a", "b", "c", "d"])
    want = [expected_depth(images[i : i + 1], 30.0, 15) for i in range(4)]
    assert out["depth"].tolist() == want
    assert len(set(want)) > 1  # the case really has samples stopping at different depths
    assert out["unet_evals"].tolist() == [2 * d for d in want]
    assert torch.allclose(out["synthesis"], images, atol=1e-4)  # constant eps: exact round trip at any depth
    curves = out["curves"]["psnr"]
    for i, d in enumerate(want):
        assert torch.isfinite(curves[i, :d]).all() and torch.isnan(curves[i, d:]).all()


def test_depth_cap_and_minimum_are_respected():
    images = images_of_contrast(1.0, 0.01, 0.3)
    out = zero_eps_pipeline(depth=6, psnr=60.0, min_depth=3)(images, ["a", "b", "c"])
    assert out["depth"].tolist() == [expected_depth(images[i : i + 1], 60.0, 6, 3) for i in range(3)]
    assert out["depth"].min() >= 3 and out["depth"].max() <= 6
    never = zero_eps_pipeline(depth=6, psnr=-100.0)(images, ["a", "b", "c"])
    assert never["depth"].tolist() == [6, 6, 6]


def test_synthesis_of_an_early_stopper_runs_beside_inverting_samples():
    images = images_of_contrast(1.0, 0.05)
    pipe = zero_eps_pipeline(depth=15, psnr=30.0)
    out = pipe(images, ["a", "b"])
    d_fast, d_slow = out["depth"].tolist()
    assert d_fast < d_slow
    calls = pipe.diffusion.unet.calls
    assert len(calls) == max(2 * d_fast, 2 * d_slow)  # no call waits for a whole batch to finish inverting
    assert [x.shape[0] for _, x in calls][: 2 * d_fast] == [2] * (2 * d_fast)


@pytest.mark.exactness
def test_sample_alone_equals_sample_in_batch_that_stops_elsewhere():
    # float64, so that what is compared is the per-sample logic, not batch-size-dependent rounding.
    diffusion, classifier = small_diffusion(), small_classifier().double()
    diffusion.unet.double()
    cfg = DiffGuardConfig(num_steps=12, depth=10, reference="unguided",
                          guidance=GuidanceConfig(scale=3.0, cutout=CutoutConfig(num=2)),
                          aes=AESConfig(enabled=True, psnr=14.0, min_depth=2))
    pipe = DiffGuardPipeline(diffusion, classifier, cfg)
    torch.manual_seed(3)
    images = torch.cat([torch.rand(3, 1, 16, 16), torch.full((2, 1, 16, 16), 0.5)]).double()
    ids = [f"s{i}" for i in range(5)]
    batch = pipe(images, ids)
    assert len(set(batch["depth"].tolist())) > 1
    for i in (0, 3):
        alone = pipe(images[i : i + 1], ids[i : i + 1])
        assert alone["depth"][0] == batch["depth"][i]
        for name, value in alone["scores"].items():
            assert torch.allclose(batch["scores"][name][i], value[0], rtol=1e-6, atol=1e-9), name


def test_aes_config_needs_a_threshold():
    with pytest.raises(ConfigError, match="aes"):
        AESConfig(enabled=True)
    with pytest.raises(ConfigError, match="min_depth"):
        DiffGuardConfig(depth=5, aes=AESConfig(enabled=True, psnr=10.0, min_depth=8))


def test_calibration_writes_an_includable_fragment(tmp_path, benchmark, small_models):
    import json

    import yaml

    from diffguard_pl import config as config_lib
    from diffguard_pl.jobs.calibration import CalibrationConfig, calibrate
    from diffguard_pl.config import EvalConfig

    argv = eval_argv(tmp_path / "cal", small_models, "diffguard.num_steps=8", "diffguard.depth=6",
                     "calibration.target=0.5", "limit_per_set=10")
    report = calibrate(config_lib.load(CalibrationConfig, argv, None), benchmark)
    fragment = yaml.safe_load((tmp_path / "cal" / "aes.yaml").read_text())
    assert fragment["diffguard"]["aes"]["enabled"] is True
    assert fragment["diffguard"]["aes"]["psnr"] == pytest.approx(report["threshold"])
    assert 0.3 <= report["candidates"][0]["stop_fraction"] <= 0.7  # the target fraction stops early
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["threshold"] == report["threshold"]
    # The fragment is a config that an evaluation includes.
    fragment_arg = f"--config={tmp_path / 'cal' / 'aes.yaml'}"
    cfg = config_lib.load(EvalConfig, [*eval_argv(tmp_path / "ev", small_models), fragment_arg], None)
    assert cfg.diffguard.aes.enabled and cfg.diffguard.aes.psnr == pytest.approx(report["threshold"])


def test_auroc_calibration_tries_candidates(tmp_path, benchmark, small_models):
    from diffguard_pl import config as config_lib
    from diffguard_pl.jobs.calibration import CalibrationConfig, calibrate

    argv = eval_argv(tmp_path / "cal", small_models, "diffguard.num_steps=6", "diffguard.depth=4",
                     "limit_per_set=6", "calibration.method=auroc", "calibration.candidates=3")
    report = calibrate(config_lib.load(CalibrationConfig, argv, None), benchmark)
    assert len(report["candidates"]) == 3
    best = max(report["candidates"], key=lambda c: c["auroc"])
    assert report["threshold"] == best["threshold"]
    assert all(0.0 <= c["auroc"] <= 1.0 and 1.0 <= c["mean_depth_ind"] <= 4.0 for c in report["candidates"])


class RecordingDISTS(torch.nn.Module):
    """Stands in for piq.DISTS (whose VGG weights cannot be downloaded here): records what it is fed."""

    seen: list = []

    def __init__(self, reduction="none"):
        super().__init__()

    def forward(self, x, y):
        RecordingDISTS.seen.append((x.clone(), y.clone()))
        return (x - y).abs().flatten(1).mean(1)


def test_aes_dists_sees_the_unclamped_latent_at_its_own_size(tmp_path, monkeypatch):
    """As the released code: 1 - DISTS of (x_t + 1) / 2 without clamping, at aes.dists_size; the final distance
    still clamps the synthesis."""
    import piq

    from diffguard_pl.method.aes import AdaptiveEarlyStop
    from diffguard_pl.method.scores import PerceptualDistances

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    for name in ("dists_weights.pt", "vgg16-397923af.pth"):
        (tmp_path / "hub" / "checkpoints" / name).write_bytes(b"stand-in")
    monkeypatch.setattr(piq, "DISTS", RecordingDISTS)
    RecordingDISTS.seen = []
    aes = AdaptiveEarlyStop(AESConfig(enabled=True, dists=0.38, dists_size=32), perceptual_size=64)
    latent = torch.linspace(-1.6, 1.6, 2 * 16 * 16).view(2, 1, 16, 16)  # beyond [-1, 1], as noisy latents are
    x0 = torch.zeros(2, 1, 16, 16)
    quality = aes.quality(latent, x0)
    seen, _ = RecordingDISTS.seen[-1]
    assert seen.shape == (2, 3, 32, 32) and seen.min() < -0.2 and seen.max() > 1.2  # unclamped, resized to 32
    assert torch.allclose(quality["dists"], 1 - RecordingDISTS()(seen, RecordingDISTS.seen[-1][1]))
    final = PerceptualDistances(["dists"], 64)
    final(latent, x0)
    seen, _ = RecordingDISTS.seen[-1]
    assert seen.shape == (2, 3, 64, 64) and seen.min() >= 0 and seen.max() <= 1  # the final distance clamps
