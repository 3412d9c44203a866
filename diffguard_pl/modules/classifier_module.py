"""LightningModule that fine-tunes a timm classifier on InD images, optionally co-trained with a diffusion model."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from diffguard_pl.config import CoTrainConfig, OptimConfig
from diffguard_pl.data.augment import random_shift
from diffguard_pl.models.classifier import ClassifierSpec, build_classifier, save_classifier
from diffguard_pl.models.diffusion import DiffusionModel
from diffguard_pl.modules.cotrain import VAL_SALT, check_timesteps, clean_estimates, random_timesteps, seeded_noise
from diffguard_pl.modules.optim import configure


class ClassifierModule(L.LightningModule):
    """Cross-entropy fine-tuning; ``self.classifier`` is the portable :class:`Classifier`.

    Co-training (``diffusion`` given): every step also classifies the diffusion
    model's clean estimates x0_pred(x_t) of the (augmented) batch at timesteps
    drawn uniformly from [cotrain.t_min, cotrain.t_max]; the loss is
    ``(1 - w) * CE(real) + w * CE(x0_pred)`` with ``w = cotrain.weight``. Real
    images and estimates go through the classifier as one batch (shared
    BatchNorm statistics). The diffusion model is frozen: no gradients, always in
    eval mode (its dropout off), its weights and buffers unchanged by training.
    Validation adds ``val/x0_acc``, the accuracy on clean estimates at per-sample
    timesteps and noise seeded by sample id.
    """

    def __init__(
        self,
        spec: ClassifierSpec,
        optim: OptimConfig,
        pretrained_path: Optional[str] = None,
        label_smoothing: float = 0.0,
        augment_shift: int = 0,
        diffusion: Optional[DiffusionModel] = None,
        cotrain: Optional[CoTrainConfig] = None,
    ):
        super().__init__()
        hparams = {"spec": asdict(spec), "optim": asdict(optim)}
        if diffusion is not None:
            cotrain = cotrain or CoTrainConfig()
            hparams["cotrain"] = asdict(cotrain)
        self.save_hyperparameters(hparams)
        self.classifier = build_classifier(spec, pretrained_path)
        self.optim_cfg = optim
        self.label_smoothing = label_smoothing
        self.augment_shift = augment_shift
        self.cotrain_cfg = cotrain
        self.train_diffusion = False  # JointModule sets True
        metric = torchmetrics.classification.MulticlassAccuracy(num_classes=spec.num_classes, average="micro")
        self.train_acc, self.val_acc, self.test_acc = metric.clone(), metric.clone(), metric.clone()
        self.unet = None
        if diffusion is not None:
            check_timesteps(cotrain, diffusion.num_train_timesteps)
            self.unet = diffusion.unet.requires_grad_(False).eval()
            self.register_buffer("alphas_cumprod", diffusion.alphas_cumprod.float(), persistent=False)
            self.diffusion_num_classes, self.diffusion_null_class = diffusion.num_classes, diffusion.null_class
            self.train_x0_acc, self.val_x0_acc = metric.clone(), metric.clone()

    @property
    def cotraining(self) -> bool:
        return self.unet is not None

    def diffusion_model(self, ema: bool = True) -> DiffusionModel:
        """The diffusion model (co-training: the frozen one) as a :class:`DiffusionModel`."""
        return DiffusionModel(self.unet, self.alphas_cumprod.double(), self.diffusion_num_classes,
                              self.diffusion_null_class)

    def train(self, mode: bool = True) -> "ClassifierModule":
        """Lightning switches the whole module to train mode each epoch; a frozen diffusion model stays in eval."""
        super().train(mode)
        if self.unet is not None and not self.train_diffusion:
            self.unet.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def clean_images(self, images: torch.Tensor, diffusion: Optional[DiffusionModel] = None,
                     t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Clean estimates in [0, 1] of ``images`` at random (or given) timesteps, as configured."""
        c = self.cotrain_cfg
        t = random_timesteps(images.shape[0], c, images.device) if t is None else t
        noise = torch.randn_like(images) if noise is None else noise
        return clean_estimates(diffusion or self.diffusion_model(), self.alphas_cumprod, images, t, noise,
                               c.clean, c.clamp)

    def classifier_losses(self, images: torch.Tensor, estimates: torch.Tensor, labels: torch.Tensor) -> dict:
        """Cross-entropies of real images and clean estimates, classified as one batch."""
        logits, logits_x0 = self(torch.cat([images, estimates])).split(images.shape[0])
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        ce_x0 = F.cross_entropy(logits_x0, labels, label_smoothing=self.label_smoothing)
        w = self.cotrain_cfg.weight
        return {"loss": (1 - w) * ce + w * ce_x0, "ce": ce, "ce_x0": ce_x0, "logits": logits, "logits_x0": logits_x0}

    def _log_train(self, n: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                   out: Optional[dict] = None) -> None:
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        if out is not None:
            self.train_x0_acc(out["logits_x0"], labels)
            self.log("train/ce_real", out["ce"], batch_size=n)
            self.log("train/ce_x0", out["ce_x0"], batch_size=n)
            self.log("train/x0_acc", self.train_x0_acc, on_step=False, on_epoch=True, batch_size=n)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = random_shift(batch["image"], self.augment_shift)
        labels = batch["label"]
        if not self.cotraining or self.cotrain_cfg.weight == 0:
            logits = self(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            self._log_train(images.shape[0], loss, logits, labels)
            return loss
        with torch.no_grad():
            estimates = self.clean_images(images)
        out = self.classifier_losses(images, estimates, labels)
        self._log_train(images.shape[0], out["loss"], out["logits"], labels, out)
        return out["loss"]

    def _eval_step(self, batch: dict, metric: torchmetrics.Metric, prefix: str) -> dict:
        keep = batch["label"] >= 0  # OOD samples (label -1) carry no class
        images, labels = batch["image"][keep], batch["label"][keep]
        logits = self(images)
        metric(logits, labels)
        n = int(keep.sum())
        self.log(f"{prefix}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=n)
        self.log(f"{prefix}/acc", metric, prog_bar=True, batch_size=n)
        return {"images": images, "labels": labels, "ids": [i for i, k in zip(batch["id"], keep.tolist()) if k]}

    @torch.no_grad()
    def _log_x0_accuracy(self, kept: dict) -> None:
        """Accuracy on clean estimates, with timesteps in [t_min, t_max] and noise seeded by sample id."""
        images = kept["images"]
        if not len(images):
            return
        c = self.cotrain_cfg
        noise, t = seeded_noise(kept["ids"], tuple(images.shape[1:]), VAL_SALT, (c.t_min, c.t_max))
        estimates = self.clean_images(images, self.diffusion_model(ema=True), t.to(images.device), noise.to(images))
        self.val_x0_acc(self(estimates), kept["labels"])
        self.log("val/x0_acc", self.val_x0_acc, prog_bar=True, batch_size=len(images))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        kept = self._eval_step(batch, self.val_acc, "val")
        if self.cotraining:
            self._log_x0_accuracy(kept)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    def export(self, directory) -> None:
        save_classifier(self.classifier, directory)

    def configure_optimizers(self) -> dict:
        return configure(self, self.classifier.parameters(), self.optim_cfg)
