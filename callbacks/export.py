"""Write the trained model in its portable format when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class ExportPortableCheckpoint(L.Callback):
    """Calls ``pl_module.export(directory)`` on rank 0 at the end of ``fit``.

    Classifiers become safetensors + JSON, diffusion models a diffusers folder:
    both load without Lightning (``load_classifier`` / ``load_diffusion``).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.directory)
            rank_zero_info(f"exported {type(pl_module).__name__} to {self.directory}")
        trainer.strategy.barrier()
