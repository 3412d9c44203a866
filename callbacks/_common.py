"""What the evaluation callbacks share: gathering to rank 0, figures, and logging to W&B or files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import lightning as L
import torch.distributed as dist


def gather_to_rank_zero(obj: Any) -> List[Any]:
    """Every rank's ``obj`` on rank 0 (a list, one entry per rank); other ranks get []."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if dist.get_rank() == 0 else []


def wandb_run(trainer: L.Trainer):
    """The W&B run behind the trainer's logger, or None when W&B is not in use."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return logger.experiment
    return None


def output_folder(trainer: L.Trainer, name: str) -> Path:
    folder = Path(trainer.default_root_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig, path: Path, trainer: L.Trainer, key: str) -> None:
    """Write a matplotlib figure as PNG and, with W&B, log it as an image under ``key``."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    run = wandb_run(trainer)
    if run is not None:
        import wandb

        run.log({key: wandb.Image(str(path))})
    plt.close(fig)
