"""Co-training (classifier on the frozen diffusion model's clean estimates) and joint training (both models)."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from diffguard_pl import config as config_lib
from diffguard_pl.config import ConfigError, CoTrainConfig, DiffusionConfig, EvalConfig, OptimConfig, TrainConfig
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.models import ClassifierSpec, DiffusionModel, build_scheduler, build_unet, load_classifier
from diffguard_pl.models import load_diffusion
from diffguard_pl.modules import ClassifierModule, JointModule
from diffguard_pl.modules.cotrain import clean_estimates, load_diffusion_with_scheduler
from diffguard_pl.jobs.train_job import train

from helpers.configs import eval_argv
from helpers.paths import ROOT

SPEC = ClassifierSpec("diffguard_resnet_tiny", num_classes=6, in_chans=1, input_size=16, mean=[0.5], std=[0.5])
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0)
# 3 steps are one (limited) epoch, so validation runs once.
FAST = ["trainer.max_steps=3", "trainer.limit_train_batches=3", "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1", "data.batch_size=16", "data.eval_batch_size=32", "trainer.log_every_n_steps=1"]


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def fit(module: L.LightningModule, benchmark, steps: int = 1) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(benchmark.train, batch_size=8, shuffle=True))
    return trainer


def tiny_diffusion(conditional: bool = False) -> tuple[DiffusionModel, object]:
    torch.manual_seed(0)
    cfg = DiffusionConfig(block_out_channels=[32, 32], attention_levels=[False, True], layers_per_block=1,
                          dropout=0.1, conditional=conditional)
    scheduler = build_scheduler(cfg)
    unet = build_unet(cfg, 1, 16, 6 if conditional else None)
    return DiffusionModel(unet, scheduler.alphas_cumprod.double(), 6 if conditional else None,
                          6 if conditional else None), scheduler


@pytest.mark.training
def test_cotrain_step_changes_classifier_and_leaves_frozen_unet_bit_identical(benchmark):
    diffusion, _ = tiny_diffusion()  # dropout 0.1: train mode would change its outputs
    module = ClassifierModule(SPEC, OPTIM, diffusion=diffusion, cotrain=CoTrainConfig(t_max=900))
    unet_before, classifier_before = snapshot(module.unet), snapshot(module.classifier)
    modes = []
    module.unet.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    fit(module, benchmark, steps=2)
    assert modes and not any(modes)  # the UNet ran, always in eval mode
    assert not changed(unet_before, module.unet)  # every parameter and buffer bit-identical
    assert all(p.grad is None and not p.requires_grad for p in module.unet.parameters())
    assert {k for k in changed(classifier_before, module.classifier) if k.endswith("weight")}


@pytest.mark.training
def test_cotrain_weight_zero_is_plain_fine_tuning(benchmark):
    diffusion, _ = tiny_diffusion()
    module = ClassifierModule(SPEC, OPTIM, diffusion=diffusion, cotrain=CoTrainConfig(weight=0.0))
    calls = []
    module.unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    fit(module, benchmark)
    assert not calls


def test_clean_estimates_pass_gradients_to_the_unet():
    diffusion, _ = tiny_diffusion()
    images = torch.rand(4, 1, 16, 16)
    estimates = clean_estimates(diffusion, diffusion.alphas_cumprod.float(), images, torch.tensor([0, 100, 500, 999]),
                                torch.randn_like(images))
    assert estimates.shape == images.shape
    estimates.square().sum().backward()
    assert diffusion.unet.conv_in.weight.grad is not None and diffusion.unet.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.training
@pytest.mark.parametrize("conditional", [False, True])
def test_joint_step_changes_classifier_and_unet(benchmark, conditional):
    diffusion, scheduler = tiny_diffusion(conditional)
    module = JointModule(SPEC, OPTIM, diffusion, scheduler, CoTrainConfig(t_max=900, ce_weight=1.0, ema_decay=0.9),
                         label_dropout=0.5)
    unet_before, classifier_before = snapshot(module.unet), snapshot(module.classifier)
    ema_before = snapshot(module.ema_unet)
    trainer = fit(module, benchmark, steps=2)
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    assert "conv_in.weight" in changed(unet_before, module.unet)
    assert "conv_in.weight" in changed(ema_before, module.ema_unet)
    assert {k for k in changed(classifier_before, module.classifier) if k.endswith("weight")}
    assert not module.ema_unet.training


@pytest.mark.training
def test_joint_ce_term_reaches_the_unet(benchmark):
    """Same seed and batches: the UNet ends up elsewhere with ce_weight 1 than with 0, so the CE gradient reaches it."""
    results = {}
    for ce_weight in (0.0, 1.0):
        diffusion, scheduler = tiny_diffusion()
        module = JointModule(SPEC, OPTIM, diffusion, scheduler, CoTrainConfig(ce_weight=ce_weight, ema_decay=0.0))
        fit(module, benchmark)
        results[ce_weight] = module.unet.conv_in.weight.detach().clone()
    assert not torch.equal(results[0.0], results[1.0])


def make_cfg(tmp_path, *overrides, files=("train_cotrain.yaml",)):
    argv = [f"--config={ROOT / 'conf' / f}" for f in files] + [f"output_dir={tmp_path}", *FAST, *overrides]
    return config_lib.load(TrainConfig, argv, None)


@pytest.mark.parametrize("name", ["train_classifier_finetune.yaml", "train_cotrain.yaml", "train_joint.yaml"])
def test_measurement_configs_load(name):
    cfg = config_lib.load(TrainConfig, [f"--config={ROOT / 'conf' / name}"], None)
    # relative to the preset's project, whatever the working directory
    assert cfg.classifier.pretrained_path == str(ROOT / "checkpoints/digits/classifier/model.safetensors")
    assert cfg.seed == 0 and cfg.trainer.max_steps == 300 and cfg.optim.lr == 1e-3


def test_config_checks():
    with pytest.raises(ConfigError, match="cotrain.t_min"):
        CoTrainConfig(t_min=500, t_max=100)
    with pytest.raises(ConfigError, match="cotrain.clean"):
        CoTrainConfig(clean="noisy")
    diffusion, _ = tiny_diffusion()
    with pytest.raises(ConfigError, match="cotrain.t_max=1000"):
        ClassifierModule(SPEC, OPTIM, diffusion=diffusion, cotrain=CoTrainConfig(t_max=1000))


@pytest.mark.slow  # the co-training step is tested above; train.py -> evaluate.py runs below for joint training
@pytest.mark.training
def test_train_cotrain_exports_classifier_for_the_evaluator(tmp_path, benchmark, small_models):
    train_dir = tmp_path / "train"
    metrics = train(make_cfg(train_dir, "classifier.pretrained_path=null",
                             f"cotrain.diffusion_path={small_models / 'diffusion'}"), benchmark)
    assert metrics["global_step"] == 3 and {"val/x0_acc", "test/acc"} <= set(metrics)
    assert (train_dir / "classifier" / "model.safetensors").is_file() and not (train_dir / "diffusion").exists()
    argv = eval_argv(tmp_path / "eval", small_models, f"models.classifier={train_dir / 'classifier'}")
    results = evaluate(config_lib.load(EvalConfig, argv, None), benchmark)
    assert "diffguard" in results["detectors"] and 0.0 <= results["id_accuracy"] <= 1.0


@pytest.mark.training
@pytest.mark.subprocess
def test_train_joint_exports_both_and_evaluate_py_takes_them(tmp_path, benchmark, small_models):
    train_dir = tmp_path / "train"
    metrics = train(make_cfg(train_dir, f"cotrain.diffusion_path={small_models / 'diffusion'}",
                             "classifier.pretrained_path=null", files=("train_joint.yaml",)), benchmark)
    assert metrics["global_step"] == 3 and {"val/x0_acc", "val/denoising", "test/acc"} <= set(metrics)
    classifier = load_classifier(train_dir / "classifier")
    diffusion = load_diffusion(train_dir / "diffusion")
    original, _ = load_diffusion_with_scheduler(small_models / "diffusion")
    assert not torch.equal(diffusion.unet.conv_in.weight, original.unet.conv_in.weight)
    assert torch.equal(diffusion.alphas_cumprod, original.alphas_cumprod)
    assert classifier(benchmark.test.images[:2]).shape == (2, 6)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *eval_argv(tmp_path / "eval", train_dir)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["num_samples"]["ind"] == 6 and "diffguard" in saved["detectors"]
    recorded = classifier.spec.trained_on  # what train.py measured is what the evaluation measures again
    assert recorded["benchmark"] == "digits" and classifier.spec.class_names == benchmark.class_names
    check = saved["classifier_check"]
    assert check["recorded_accuracy"] == recorded["validation_accuracy"]
    assert check["validation_accuracy"] == pytest.approx(recorded["validation_accuracy"], abs=1e-6)
    fingerprint = (tmp_path / "eval" / "config.yaml").read_text()
    assert str(train_dir / "diffusion") in fingerprint and str(train_dir / "classifier") in fingerprint


@pytest.mark.training
def test_joint_resumes_with_both_optimisers(tmp_path, benchmark, small_models):
    args = [f"cotrain.diffusion_path={small_models / 'diffusion'}", "classifier.pretrained_path=null"]
    train(make_cfg(tmp_path / "a", *args, "trainer.max_steps=2", files=("train_joint.yaml",)), benchmark)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert len(state["optimizer_states"]) == 2 and len(state["lr_schedulers"]) == 2
    resumed = make_cfg(tmp_path / "b", *args, "trainer.max_steps=4", f"resume={ckpt}", files=("train_joint.yaml",))
    assert train(resumed, benchmark)["global_step"] == 4
