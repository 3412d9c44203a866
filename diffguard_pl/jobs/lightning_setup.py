"""What both Lightning jobs (training and evaluation) set up the same way: the logger, the Trainer's arguments
taken from :class:`~diffguard_pl.config.TrainerConfig`, and a quiet console."""

from __future__ import annotations

import logging
import warnings
from dataclasses import fields
from pathlib import Path

from diffguard_pl.config import TrainerConfig

# Trainer arguments that are not taken from TrainerConfig field by field (each job passes its own).
JOB_OWNED = ("max_steps", "max_epochs", "log_every_n_steps", "check_val_every_n_epoch", "limit_train_batches",
             "limit_val_batches", "deterministic")
NOT_TRAINER = ("checkpoint_every_n_steps",)  # read by the training job, not a lightning.Trainer argument


def trainer_kwargs(t: TrainerConfig, training: bool = False) -> dict:
    """``lightning.Trainer`` arguments from the config: every field (training), or those an evaluation uses."""
    return {f.name: getattr(t, f.name) for f in fields(t)
            if f.name not in NOT_TRAINER and (training or f.name not in JOB_OWNED)}


def quiet_lightning(verbose: bool = False) -> None:
    """Silence Lightning's start-up lines (GPU / TPU availability, seeds, tips) and known harmless warnings,
    unless ``verbose``; errors and real warnings still show."""
    if verbose:
        return
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.distributed",
                 "lightning.pytorch.utilities.distributed", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "smaller than the logging interval": Lightning counts the interval in global steps, so an epoch shorter than
    # log_every_n_steps is still logged every log_every_n_steps steps
    for pattern in (".*isinstance\\(treespec, LeafSpec\\).*", ".*does not have many workers.*",
                    ".*Found .* module\\(s\\) in eval mode.*", ".*litlogger.*", ".*LeafSpec.*",
                    ".*smaller than the logging interval.*",
                    ".*Experiment logs directory .* exists and is not empty.*",  # a resumed run's own logs
                    # joint training steps its two optimisers by hand; the state after the step is what resume needs
                    ".*ModelCheckpoint with manual optimization and every_n_train_steps.*"):
        warnings.filterwarnings("ignore", message=pattern)


def build_logger(cfg, output_dir: Path, metrics_footer: bool = True):
    """CSV by default; W&B (offline unless configured) with logger=wandb. ``cfg`` has .logger and .wandb.

    The W&B run starts here, named, tagged, grouped and typed, with the models it reads as input artifacts
    (diffguard_pl/jobs/wandb_run.py). W&B's console stays to the point: Lightning passes ``anonymous=None`` to
    ``wandb.init``, which W&B (0.31 here) answers with a warning that the setting has no effect, so it is not
    passed; ``metrics_footer=False`` (an evaluation, whose results the job prints itself) leaves out W&B's closing
    panels of history sparklines and summary values.
    """
    if cfg.logger == "wandb":
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        from diffguard_pl.jobs.wandb_run import init_arguments, start

        footer = {} if metrics_footer else {"max_end_of_run_history_metrics": 0, "max_end_of_run_summary_metrics": 0}
        logger = WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, save_dir=str(output_dir),
                             offline=cfg.wandb.offline, settings=wandb.Settings(**footer), **init_arguments(cfg))
        # Lightning's constructor always sets it (lightning/pytorch/loggers/wandb.py); wandb.init's default is unset.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        try:
            start(logger, cfg)
        except BaseException:
            finish_logger(logger)
            raise
        return logger
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(output_dir), name="logs", version="")


def finish_logger(logger) -> None:
    """Always close a W&B run, also after an exception."""
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None and hasattr(experiment, "finish"):
        experiment.finish()
