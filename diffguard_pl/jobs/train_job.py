"""Build the objects a training run needs from a :class:`TrainConfig` and run it.

Outputs in ``cfg.output_dir``: ``config.yaml`` (the resolved config),
``checkpoints/`` (Lightning checkpoints for resuming), ``classifier/``,
``diffusion/`` or ``encoder/`` (the portable model; task=joint writes both of the first two), ``logs/`` (CSV
metrics) or ``wandb/`` (with the exported models as output artifacts, diffguard_pl/jobs/wandb_run.py), and
``metrics.json`` (final validation / test figures). The console ends with those
figures and the exported folders.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from diffguard_pl.callbacks import ExportPortableCheckpoint
from diffguard_pl import config_loading
from diffguard_pl.config import TrainConfig
from diffguard_pl.jobs.lightning_setup import build_logger, finish_logger, quiet_lightning, trainer_kwargs
from diffguard_pl.data import Benchmark
from diffguard_pl.data.datamodule import BenchmarkDataModule
from diffguard_pl.models.classifier import ClassifierSpec
from diffguard_pl.models.diffusion import build_scheduler, build_unet
from diffguard_pl.modules import ClassifierModule, DiffusionModule, JointModule
from diffguard_pl.modules.contrastive import ContrastiveModule
from diffguard_pl.modules.cotrain import load_diffusion_with_scheduler

# task -> the folders it exports under OUT, keyed by the evaluate.py key that loads each
EXPORTS = {
    "classifier": {"models.classifier": "classifier"},
    "cotrain": {"models.classifier": "classifier"},
    "diffusion": {"models.diffusion": "diffusion"},
    "joint": {"models.classifier": "classifier", "models.diffusion": "diffusion"},
    "contrastive": {"models.encoder": "encoder"},
}


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
        class_names=list(benchmark.class_names) if benchmark.class_names is not None else None,
    )


def build_module(cfg: TrainConfig, benchmark: Benchmark) -> L.LightningModule:
    classifier_args = dict(
        pretrained_path=cfg.classifier.pretrained_path,
        label_smoothing=cfg.classifier.label_smoothing,
        augment_shift=cfg.classifier.augment_shift,
    )
    if cfg.task == "classifier":
        return ClassifierModule(classifier_spec(cfg, benchmark), cfg.optim, **classifier_args)
    if cfg.task == "contrastive":  # the backbone without a classification head
        spec = replace(classifier_spec(cfg, benchmark), num_classes=0)
        return ContrastiveModule(spec, cfg.optim, cfg.contrastive)
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


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` and, before any export swaps weights, at the end of training."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # with the optimiser state, to resume from


def build_trainer(cfg: TrainConfig, output_dir: Path, logger, export_dir: Path) -> L.Trainer:
    # last.ckpt every few steps and at the end (a resume loses at most that much), best.ckpt at validations
    # enable_version_counter=False: a run resumed in its own folder overwrites last.ckpt / best.ckpt instead of
    # writing last-v1.ckpt beside them (which a second resume from last.ckpt would miss)
    last = LastCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0,
                          every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, enable_version_counter=False)
    best = None
    if cfg.monitor:
        best = ModelCheckpoint(dirpath=output_dir / "checkpoints", save_top_k=1, monitor=cfg.monitor,
                               mode=cfg.monitor_mode, filename="best", enable_version_counter=False)
    export = ExportPortableCheckpoint(export_dir, best_of=best)
    callbacks = [last] + ([best] if best else []) + [export, LearningRateMonitor("step")]
    return L.Trainer(
        **trainer_kwargs(cfg.trainer, training=True),
        default_root_dir=str(output_dir),
        logger=logger,
        callbacks=callbacks,
        enable_model_summary=cfg.verbose,
    )


def validate_exported(trainer: L.Trainer, module: L.LightningModule, datamodule, cfg: TrainConfig,
                      export: ExportPortableCheckpoint) -> None:
    """After fit: export if the export still waits, and leave the exported weights' validation metrics in
    ``trainer.callback_metrics``."""
    if export.pending:  # the run ended between validations: measure the final weights before choosing
        (final,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        export.export_best(trainer, module, float(final[cfg.monitor]))
    if cfg.monitor:  # the export may hold an earlier, better checkpoint: measure it, without a second log row
        loggers, trainer.loggers = trainer.loggers, []
        try:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        finally:
            trainer.loggers = loggers
    elif export.validated_step != trainer.global_step:  # the last weights (those exported) were never validated
        trainer.validate(module, datamodule=datamodule, verbose=False)


def record_training(folder: Path, benchmark: Benchmark, batch_size: int, device) -> dict:
    """Add to the exported classifier's ``classifier.json`` what it was trained on (``trained_on``: the benchmark,
    its accuracy on the InD validation split, measured on the exported weights as the evaluation measures it), so
    that an evaluation can refuse it on another benchmark (diffguard_pl/detectors/classifier_check.py)."""
    from diffguard_pl.detectors.classifier_check import training_record
    from diffguard_pl.models.classifier import load_classifier, save_spec

    classifier = load_classifier(folder).to(device)
    classifier.spec.trained_on = training_record(classifier, benchmark, batch_size)
    save_spec(classifier.spec, folder)
    return classifier.spec.trained_on


def summary(task: str, metrics: Dict[str, float], output_dir: Path, monitor: Optional[str] = None,
            trained_on: Optional[dict] = None) -> List[str]:
    """What the console shows at the end of a run: the exported model's figures and where it is (``trained_on``:
    what :func:`record_training` wrote into the exported classifier's classifier.json)."""
    def figures(prefix: str) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(prefix))

    which = f"the validated weights with the best {monitor}" if monitor else "the last weights"
    lines = [f"trained {task} for {metrics['global_step']} steps; exported {which}"]
    lines += [f"{name}: {figures(prefix)}" for name, prefix in (("validation", "val/"), ("test", "test/"))
              if figures(prefix)]
    for key, folder in EXPORTS[task].items():
        lines.append(f"exported {folder}: {output_dir / folder}  (evaluate.py {key}={output_dir / folder})")
    if trained_on is not None and trained_on["validation_accuracy"] is not None:
        lines.append(f"recorded in classifier.json: trained on {trained_on['benchmark']}, "
                     f"{100 * trained_on['validation_accuracy']:.1f}% InD validation accuracy on "
                     f"{trained_on['validation_images']:,} images (evaluate.py refuses it far below that)")
    lines.append(f"metrics: {output_dir / 'metrics.json'}; resume from {output_dir / 'checkpoints' / 'last.ckpt'}")
    return lines


def train(cfg: TrainConfig, benchmark: Optional[Benchmark] = None) -> dict:
    """Train one model as configured; returns the final metrics (also in metrics.json) and prints them."""
    quiet_lightning(cfg.verbose)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_loading.save(cfg, output_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=cfg.verbose)

    datamodule = BenchmarkDataModule(cfg.data, benchmark=benchmark)
    datamodule.setup()
    module = build_module(cfg, datamodule.benchmark)
    folders = list(EXPORTS[cfg.task].values())
    export_dir = output_dir / folders[0] if len(folders) == 1 else output_dir  # joint: both folders
    logger = build_logger(cfg, output_dir)
    try:
        trainer = build_trainer(cfg, output_dir, logger, export_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
        export = next(c for c in trainer.callbacks if isinstance(c, ExportPortableCheckpoint))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # the last training figures
        validate_exported(trainer, module, datamodule, cfg, export)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        if cfg.task != "diffusion":
            (tested,) = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update({k: float(v) for k, v in tested.items()})
        metrics["global_step"] = int(trainer.global_step)
        if cfg.logger == "wandb" and trainer.is_global_zero:  # the exported models as the run's output artifacts
            from diffguard_pl.jobs.wandb_run import log_exports

            log_exports(logger.experiment, {key: output_dir / folder for key, folder in EXPORTS[cfg.task].items()},
                        cfg.task)
    finally:
        finish_logger(logger)
    if trainer.is_global_zero:
        record = None
        if "models.classifier" in EXPORTS[cfg.task]:
            record = record_training(output_dir / EXPORTS[cfg.task]["models.classifier"], datamodule.benchmark,
                                     cfg.data.eval_batch_size, module.device)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print("\n".join(summary(cfg.task, metrics, output_dir, cfg.monitor, record)), flush=True)
    return metrics
