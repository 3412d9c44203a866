"""LightningModule that fine-tunes a timm classifier on InD images."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from diffguard_pl.config import OptimConfig
from diffguard_pl.data.augment import random_shift
from diffguard_pl.models.classifier import ClassifierSpec, build_classifier, save_classifier
from diffguard_pl.modules.optim import configure


class ClassifierModule(L.LightningModule):
    """Cross-entropy fine-tuning; ``self.classifier`` is the portable :class:`Classifier`."""

    def __init__(
        self,
        spec: ClassifierSpec,
        optim: OptimConfig,
        pretrained_path: Optional[str] = None,
        label_smoothing: float = 0.0,
        augment_shift: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters({"spec": asdict(spec), "optim": asdict(optim)})
        self.classifier = build_classifier(spec, pretrained_path)
        self.optim_cfg = optim
        self.label_smoothing = label_smoothing
        self.augment_shift = augment_shift
        metric = torchmetrics.classification.MulticlassAccuracy(num_classes=spec.num_classes, average="micro")
        self.train_acc, self.val_acc, self.test_acc = metric.clone(), metric.clone(), metric.clone()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = random_shift(batch["image"], self.augment_shift)
        logits = self(images)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        self.train_acc(logits, batch["label"])
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _eval_step(self, batch: dict, metric: torchmetrics.Metric, prefix: str) -> None:
        keep = batch["label"] >= 0  # OOD samples (label -1) carry no class
        logits = self(batch["image"][keep])
        metric(logits, batch["label"][keep])
        n = int(keep.sum())
        self.log(f"{prefix}/loss", F.cross_entropy(logits, batch["label"][keep]), sync_dist=True, batch_size=n)
        self.log(f"{prefix}/acc", metric, prog_bar=True, batch_size=n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    def export(self, directory) -> None:
        save_classifier(self.classifier, directory)

    def configure_optimizers(self) -> dict:
        return configure(self, self.classifier.parameters(), self.optim_cfg)
