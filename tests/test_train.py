import json
import subprocess
import sys

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import TrainConfig
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.detectors.classifier_check import validation_accuracy
from diffguard_pl.jobs.train_job import train

from helpers.paths import ROOT

pytestmark = pytest.mark.training  # every test here runs train() or train.py

FAST = ["trainer.max_steps=3", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
        "data.batch_size=16", "trainer.log_every_n_steps=1"]
TINY_UNET = ["diffusion.block_out_channels=[32,32]", "diffusion.attention_levels=[false,true]",
             "diffusion.layers_per_block=1"]


def make_cfg(tmp_path, *overrides, files=("train_classifier.yaml",)):
    argv = [f"--config={ROOT / 'conf' / f}" for f in files] + [f"output_dir={tmp_path}", *FAST, *overrides]
    return config_lib.load(TrainConfig, argv, None)


def test_train_classifier_exports_loadable_model(tmp_path, benchmark):
    metrics = train(make_cfg(tmp_path), benchmark)
    assert metrics["global_step"] == 3 and 0.0 <= metrics["test/acc"] <= 1.0
    classifier = load_classifier(tmp_path / "classifier")
    assert classifier(benchmark.test.images[:4]).shape == (4, 6)
    # what the evaluation checks it against (diffguard_pl/detectors/classifier_check.py): every InD validation
    # image, though training validated one batch (trainer.limit_val_batches=1)
    measured, n = validation_accuracy(classifier, benchmark.val, 64, cache=False)
    assert classifier.spec.class_names == benchmark.class_names
    assert classifier.spec.trained_on == {"benchmark": "digits", "validation_images": n,
                                          "validation_accuracy": pytest.approx(measured, abs=1e-6)}
    assert n == len(benchmark.val)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 3
    saved = config_lib.load(TrainConfig, [f"--config={tmp_path / 'config.yaml'}"], None)
    assert saved.output_dir == str(tmp_path) and saved.trainer.max_steps == 3
    assert "train/loss" in (tmp_path / "logs" / "metrics.csv").read_text()


@pytest.mark.parametrize("cfg_file", ["train_diffusion_uncond.yaml", "train_diffusion_cond.yaml"])
def test_train_diffusion_exports_loadable_model(tmp_path, benchmark, cfg_file):
    cfg = make_cfg(tmp_path, *TINY_UNET, files=(cfg_file,))
    train(cfg, benchmark)
    model = load_diffusion(tmp_path / "diffusion")
    assert model.conditional == cfg.diffusion.conditional
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert model.eps(x, torch.tensor([10, 900])).shape == x.shape
    assert (tmp_path / "diffusion" / "model_index.json").is_file()


def test_final_weights_are_validated_when_the_run_ends_between_validations(tmp_path, benchmark, capsys):
    """7 steps, validation every 2 epochs of 2 batches (after step 4 only): the last 3 steps are unmeasured
    until the job validates them; the export keeps the better weights and last.ckpt holds step 7."""
    cfg = make_cfg(tmp_path, *TINY_UNET, "trainer.max_steps=7", "trainer.limit_train_batches=2",
                   "trainer.check_val_every_n_epoch=2", "trainer.checkpoint_every_n_steps=3",
                   files=("train_diffusion_uncond.yaml",))
    assert cfg.monitor == "val/loss"
    train(cfg, benchmark)
    logged = [line for line in (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[1:]
              if line.split(",")[-1]]  # rows with a val/loss
    assert len(logged) == 2  # the validation after step 4 and the job's validation of the final weights
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7
    assert (tmp_path / "diffusion" / "model_index.json").is_file()


def test_training_changes_weights_and_ema_lags(tmp_path, benchmark):
    from diffguard_pl.jobs.train_job import build_module

    cfg = make_cfg(tmp_path, *TINY_UNET, files=("train_diffusion_cond.yaml",))
    torch.manual_seed(0)
    before = build_module(cfg, benchmark).unet.state_dict()
    train(cfg, benchmark)
    after = load_diffusion(tmp_path / "diffusion").unet.state_dict()  # EMA weights
    key = "conv_in.weight"
    assert not torch.equal(before[key], after[key])


def test_resume_continues_from_lightning_checkpoint(tmp_path, benchmark):
    train(make_cfg(tmp_path / "a"), benchmark)
    resumed = make_cfg(tmp_path / "b", "trainer.max_steps=5", f"resume={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}")
    assert train(resumed, benchmark)["global_step"] == 5


def test_resume_in_place_keeps_saving_to_last_ckpt(tmp_path, benchmark):
    """The documented resume (same output folder, a larger max_steps): the periodic saves overwrite last.ckpt, so
    a second interruption resumes from the newest one (Lightning would otherwise save to last-v1.ckpt)."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    train(make_cfg(tmp_path, "trainer.max_steps=2"), benchmark)
    train(make_cfg(tmp_path, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2", f"resume={last}"), benchmark)
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
    assert torch.load(last, weights_only=False)["global_step"] == 6


def test_wandb_offline_run_is_written(tmp_path, benchmark, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train(make_cfg(tmp_path, "logger=wandb", "wandb.name=unit"), benchmark)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.subprocess
def test_cli_unknown_key_fails_before_work(tmp_path):
    result = run_cli(f"output_dir={tmp_path}", "trainer.max_stepss=3")
    assert result.returncode == 2
    assert "max_stepss" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "config.yaml").exists()


def printed_figures(stdout: str, name: str) -> dict:
    """The figures of the summary line ``name: key value, key value``."""
    (line,) = [line for line in stdout.splitlines() if line.startswith(f"{name}: ")]
    return {key: float(value) for key, value in (item.split() for item in line[len(name) + 2:].split(", "))}


@pytest.mark.subprocess
def test_cli_default_config_trains_and_ends_with_the_figures_and_the_exported_model(tmp_path):
    """The run stops mid-epoch (3 steps), so the job validates the exported weights itself; the console ends with
    their validation and test figures (those of metrics.json) and the export's path, without Lightning's model
    summary table or its ``weights_only`` notice."""
    result = run_cli(f"output_dir={tmp_path}", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "classifier" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for name, prefix in (("validation", "val/"), ("test", "test/")):
        shown = printed_figures(result.stdout, name)
        assert set(shown) == {k for k in saved if k.startswith(prefix)} and shown
        assert all(shown[k] == pytest.approx(saved[k], rel=1e-3) for k in shown)
    assert f"exported classifier: {tmp_path / 'classifier'}" in result.stdout
    record = json.loads((tmp_path / "classifier" / "classifier.json").read_text())["trained_on"]
    assert (f"recorded in classifier.json: trained on digits, {100 * record['validation_accuracy']:.1f}% InD "
            f"validation accuracy on 162 images") in result.stdout
    console = result.stdout + result.stderr
    assert "Total params" not in console and "| Name" not in console and "weights_only" not in console


def test_the_summary_names_every_exported_folder_and_the_key_that_loads_it(tmp_path):
    from diffguard_pl.jobs.train_job import summary

    lines = summary("joint", {"global_step": 4, "val/acc": 0.5, "test/acc": 0.25}, tmp_path)
    for key, folder in (("models.classifier", "classifier"), ("models.diffusion", "diffusion")):
        assert any(str(tmp_path / folder) in line and f"{key}={tmp_path / folder}" in line for line in lines)
    assert "validation: val/acc 0.5" in lines and "test: test/acc 0.25" in lines


@pytest.mark.subprocess
def test_cli_unknown_timm_model_is_explained(tmp_path):
    result = run_cli(f"output_dir={tmp_path}", "classifier.arch=resnet_does_not_exist", *FAST)
    assert result.returncode != 0
    assert "Unknown timm architecture 'resnet_does_not_exist'" in result.stderr
