"""Write the trained model in its portable format when training ends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class ExportPortableCheckpoint(L.Callback):
    """Calls ``pl_module.export(directory)`` on rank 0 at the end of ``fit``.

    Classifiers become safetensors + JSON, diffusion models a diffusers folder:
    both load without Lightning (``load_classifier`` / ``load_diffusion``).
    With ``best_of`` (a monitoring ModelCheckpoint), the best checkpoint's
    weights are exported instead of the last ones.
    """

    def __init__(self, directory: str | Path, best_of: Optional[ModelCheckpoint] = None):
        self.directory = Path(directory)
        self.best_of = best_of

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            which = "last"
            if self.best_of is not None and self.best_of.best_model_path:
                state = torch.load(self.best_of.best_model_path, map_location="cpu", weights_only=False)
                pl_module.load_state_dict(state["state_dict"])
                which = f"best ({self.best_of.monitor}={float(self.best_of.best_model_score):.5f})"
            pl_module.export(self.directory)
            rank_zero_info(f"exported the {which} {type(pl_module).__name__} to {self.directory}")
        trainer.strategy.barrier()
