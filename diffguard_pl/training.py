"""Build the objects a training run needs from a :class:`TrainConfig` and run it.

Outputs in ``cfg.output_dir``: ``config.yaml`` (the resolved config),
``checkpoints/`` (Lightning checkpoints for resuming), ``classifier/`` or
``diffusion/`` (the portable model; task=joint writes both), ``logs/`` (CSV
metrics) or ``wandb/``, and ``metrics.json`` (final validation / test figures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from callbacks import ExportPortableCheckpoint
from diffguard_pl import config as config_lib
from diffguard_pl.config import TrainConfig, TrainerConfig
from diffguard_pl.data import Benchmark, BenchmarkDataModule
from diffguard_pl.models.classifier import ClassifierSpec
from diffguard_pl.models.diffusion import build_scheduler, build_unet
from diffguard_pl.modules import ClassifierModule, DiffusionModule, JointModule
from diffguard_pl.modules.cotrain import load_diffusion_with_scheduler


def build_logger(cfg, output_dir: Path):
    """CSV by default; W&B (offline unless configured) with logger=wandb. ``cfg`` has .logger and .wandb."""
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name,
            tags=list(cfg.wandb.tags),
            save_dir=str(output_dir),
            offline=cfg.wandb.offline,
        )
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(output_dir), name="logs", version="")


def finish_logger(logger) -> None:
    """Always close a W&B run, also after an exception."""
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None and hasattr(experiment, "finish"):
        experiment.finish()


def classifier_spec(cfg: TrainConfig, benchmark: Benchmark) -> ClassifierSpec:
    c = cfg.classifier
    timm_kwargs = dict(c.timm_kwargs)
    if c.drop_rate:
        timm_kwargs["drop_rate"] = c.drop_rate
    return ClassifierSpec(
        arch=c.arch,
        num_classes=benchmark.num_classes,
        in_chans=benchmark.channels,
        input_size=c.input_size or benchmark.resolution,
        mean=list(c.mean) if c.mean is not None else [0.5] * benchmark.channels,
        std=list(c.std) if c.std is not None else [0.5] * benchmark.channels,
        timm_kwargs=timm_kwargs,
    )


def build_module(cfg: TrainConfig, benchmark: Benchmark) -> L.LightningModule:
    classifier_args = dict(
        pretrained_path=cfg.classifier.pretrained_path,
        label_smoothing=cfg.classifier.label_smoothing,
        augment_shift=cfg.classifier.augment_shift,
    )
    if cfg.task == "classifier":
        return ClassifierModule(classifier_spec(cfg, benchmark), cfg.optim, **classifier_args)
    if cfg.task in ("cotrain", "joint"):
        diffusion, scheduler = load_diffusion_with_scheduler(cfg.cotrain.diffusion_path)
        if cfg.task == "cotrain":
            return ClassifierModule(classifier_spec(cfg, benchmark), cfg.optim, diffusion=diffusion,
                                    cotrain=cfg.cotrain, **classifier_args)
        return JointModule(classifier_spec(cfg, benchmark), cfg.optim, diffusion, scheduler, cfg.cotrain,
                           label_dropout=cfg.diffusion.label_dropout, **classifier_args)
    num_classes = benchmark.num_classes if cfg.diffusion.conditional else None
    return DiffusionModule(
        build_unet(cfg.diffusion, benchmark.channels, benchmark.resolution, num_classes),
        build_scheduler(cfg.diffusion),
        cfg.optim,
        num_classes=num_classes,
        label_dropout=cfg.diffusion.label_dropout,
        ema_decay=cfg.diffusion.ema_decay,
        augment_shift=cfg.diffusion.augment_shift,
    )


def trainer_kwargs(t: TrainerConfig) -> dict:
    """The ``lightning.Trainer`` arguments every entry point takes from the config."""
    return dict(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        enable_progress_bar=t.enable_progress_bar,
    )


def build_trainer(cfg: TrainConfig, output_dir: Path, logger, export_dir: Path) -> L.Trainer:
    t = cfg.trainer
    if cfg.monitor:
        checkpoints = ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=1,
                                      monitor=cfg.monitor, mode=cfg.monitor_mode, filename="best")
    else:
        checkpoints = ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0)
    export = ExportPortableCheckpoint(export_dir, best_of=checkpoints if cfg.monitor else None)
    callbacks = [checkpoints, export, LearningRateMonitor("step")]
    return L.Trainer(
        **trainer_kwargs(t),
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        deterministic=t.deterministic,
        default_root_dir=str(output_dir),
        logger=logger,
        callbacks=callbacks,
    )


def train(cfg: TrainConfig, benchmark: Optional[Benchmark] = None) -> dict:
    """Train one model as configured; returns the final metrics (also in metrics.json)."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, output_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True)

    datamodule = BenchmarkDataModule(cfg.data, benchmark=benchmark)
    datamodule.setup()
    module = build_module(cfg, datamodule.benchmark)
    export_dir = {"classifier": output_dir / "classifier", "cotrain": output_dir / "classifier",
                  "diffusion": output_dir / "diffusion", "joint": output_dir}[cfg.task]  # joint: both folders
    logger = build_logger(cfg, output_dir)
    try:
        trainer = build_trainer(cfg, output_dir, logger, export_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.task != "diffusion":
            (tested,) = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update({k: float(v) for k, v in tested.items()})
        metrics["global_step"] = int(trainer.global_step)
    finally:
        finish_logger(logger)
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
