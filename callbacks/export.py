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
    With ``best_of`` (a monitoring ModelCheckpoint) the weights with the best
    monitored value are exported. When the last step was never validated (the
    run ended between validations), the export waits: the training job then
    validates the final weights and calls :meth:`export_best` with their value,
    so the final weights are never passed over unmeasured.
    """

    def __init__(self, directory: str | Path, best_of: Optional[ModelCheckpoint] = None):
        self.directory = Path(directory)
        self.best_of = best_of
        self.validated_step = -1
        self.pending = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_of is not None and trainer.global_step != self.validated_step:
            self.pending = True  # the job validates the final weights, then calls export_best
            return
        self.export_best(trainer, pl_module)

    def export_best(self, trainer: L.Trainer, pl_module: L.LightningModule, final: Optional[float] = None) -> None:
        """Export the best of the best checkpoint and the current weights (whose monitored value is ``final``)."""
        self.pending = False
        if trainer.is_global_zero:
            which = "last"
            best = self.best_of
            if best is not None and best.best_model_path:
                score = float(best.best_model_score)
                better = final is not None and (final < score if best.mode == "min" else final > score)
                if better:
                    which = f"last ({best.monitor}={final:.5f}, better than the best checkpoint's {score:.5f})"
                else:
                    state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
                    pl_module.load_state_dict(state["state_dict"])
                    which = f"best ({best.monitor}={score:.5f})"
            pl_module.export(self.directory)
            rank_zero_info(f"exported the {which} {type(pl_module).__name__} to {self.directory}")
        trainer.strategy.barrier()
