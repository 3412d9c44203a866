"""The walk (diffguard_pl/method/walk.py) directly: every sample on its own schedule in shared denoiser batches,
inversion and synthesis composable, and the dry run's plan counting what a run spends."""

import csv

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import CutoutConfig, DiffGuardConfig, EvalConfig, GuidanceConfig
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.models import DiffusionModel

from helpers.configs import eval_argv
from helpers.models import ALPHAS, small_classifier


class SampleEps(torch.nn.Module):
    """A float64 eps model that depends on each sample and timestep alone (not on its batch), recording the
    batch size and timesteps of every call."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64) * 0.5)
        self.config = type("Config", (), {"in_channels": 1, "sample_size": 16})()
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(t.tolist())
        return type("Out", (), {"sample": torch.tanh(self.conv(x) * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / 500))})()


def pipeline(**kw):
    cfg = DiffGuardConfig(num_steps=10, **{"depth": 5, **kw})
    unet = SampleEps()
    return DiffGuardPipeline(DiffusionModel(unet, ALPHAS), small_classifier().double(), cfg), unet


@pytest.mark.exactness
def test_samples_of_different_depths_walk_their_own_levels_in_shared_batches():
    pipe, unet = pipeline(guidance=GuidanceConfig(scale=2.0, cutout=CutoutConfig(num=2)))
    latent = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    labels, ids, depth = torch.tensor([0, 1, 2]), ["a", "b", "c"], torch.tensor([2, 5, 3])
    together = pipe.run(latent, ids, labels, False, latent=latent, depth=depth)
    # one denoiser call per iteration over every sample still synthesising, each at its own timestep
    ladder = pipe.ladder
    assert [len(call) for call in unet.calls] == [3, 3, 2, 1, 1]
    assert unet.calls[0] == [int(ladder.timesteps[d]) for d in (2, 5, 3)]
    for i in range(3):  # each sample as if it walked alone
        alone = pipe.run(latent[i:i + 1], ids[i:i + 1], labels[i:i + 1], False, latent=latent[i:i + 1],
                         depth=depth[i:i + 1])
        assert torch.allclose(together["synthesis"][i], alone["synthesis"][0], rtol=0, atol=1e-12), i


@pytest.mark.exactness
def test_inversion_then_synthesis_is_the_whole_walk():
    pipe, unet = pipeline(reference="unguided", guidance=GuidanceConfig(scale=2.0, cutout=CutoutConfig(num=2)))
    x0 = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    labels, ids = torch.tensor([3, 4]), ["a", "b"]
    steps = []
    pipe.walker.on_step = lambda step, most: steps.append((step, most))
    whole = pipe.run(x0, ids, labels, True)
    assert steps == [(k, 10) for k in range(1, 11)]  # 5 inversion and 5 synthesis iterations
    inverted = pipe.run(x0, ids, labels, True, invert_only=True)
    assert torch.equal(inverted["latent"], whole["latent"]) and inverted["depth"].tolist() == [5, 5]
    parts = pipe.run(x0, ids, labels, True, latent=inverted["latent"], depth=inverted["depth"])
    for key in ("synthesis", "reference"):
        assert torch.allclose(parts[key], whole[key], rtol=0, atol=1e-12), key
    assert not torch.allclose(whole["synthesis"], whole["reference"])  # guidance moved the synthesis


@pytest.mark.parametrize("extra", [[], ["diffguard.reference=unguided", "diffguard.ladder=released"]])
def test_the_dry_runs_plan_counts_what_the_run_spends(tmp_path, small_models, benchmark, capsys, extra):
    argv = eval_argv(tmp_path / "out", small_models, "oracle=paper", "callbacks.curves=false",
                     "callbacks.score_plots=false", "callbacks.reconstructions=0", *extra)
    evaluate(config_lib.load(EvalConfig, argv + ["dry_run=true"], None), benchmark)
    plan = capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    assert "oracle: paper; paper: the paper's oracle" in plan
    evaluate(config_lib.load(EvalConfig, argv, None), benchmark)
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    without_oracle = {int(r["depth"]) for r in rows}  # no AES: every sample at full depth
    line = next(line for line in plan.splitlines() if line.startswith("denoiser evaluations"))
    per_image = int(line.split("at most ")[1].split(" per image")[0])
    cfg = config_lib.load(EvalConfig, argv, None)
    steps = cfg.diffguard.depth + (cfg.diffguard.ladder == "released")
    # oracle re-synthesis is the only extra: one synthesis per relabelled sample
    spent = {int(r["unet_evals"]) - per_image for r in rows}
    assert without_oracle == {cfg.diffguard.depth} and 0 in spent and spent <= {0, steps}
    assert f"{len(rows):,} images" in line
