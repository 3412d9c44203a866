"""LightningModule that trains a diffusers UNet2DModel as an epsilon-predicting DDPM."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from diffguard_pl.config import OptimConfig
from diffguard_pl.data.augment import random_shift
from diffguard_pl.seeding import sample_seed
from diffguard_pl.models.diffusion import DiffusionModel, save_diffusion, schedule_alphas_cumprod
from diffguard_pl.modules.optim import configure


def per_sample_noise(ids: list[str], shape: tuple, num_timesteps: int, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps that depend only on each sample's id (fixed validation loss)."""
    noise, steps = [], []
    for sample_id in ids:
        g = torch.Generator().manual_seed(sample_seed(sample_id, salt))
        noise.append(torch.randn(shape, generator=g))
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return torch.stack(noise), torch.cat(steps)


class DiffusionModule(L.LightningModule):
    """DDPM training with EMA weights. Conditional models drop labels to the null class.

    ``self.ema_unet`` holds the exponential moving average used for validation and export.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        optim: OptimConfig,
        num_classes: Optional[int] = None,
        label_dropout: float = 0.1,
        ema_decay: float = 0.999,
        augment_shift: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(
            {"unet": dict(unet.config), "optim": asdict(optim), "num_classes": num_classes,
             "label_dropout": label_dropout, "ema_decay": ema_decay, "augment_shift": augment_shift}
        )
        self.unet = unet
        self.ema_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        self.noise_scheduler = scheduler
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.float(), persistent=False)
        self.optim_cfg = optim
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.ema_decay = ema_decay
        self.augment_shift = augment_shift

    @property
    def null_class(self) -> Optional[int]:
        return self.num_classes

    def diffusion_model(self, ema: bool = True) -> DiffusionModel:
        """The trained denoiser as a :class:`DiffusionModel` (EMA weights by default)."""
        unet = self.ema_unet if ema else self.unet
        return DiffusionModel(unet, schedule_alphas_cumprod(self.noise_scheduler), self.num_classes, self.null_class)

    def _loss(self, unet: UNet2DModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              labels: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(x_t, t, class_labels=labels).sample
        return F.mse_loss(pred[:, : x0.shape[1]], noise)

    def _labels(self, batch: dict, drop: bool) -> Optional[torch.Tensor]:
        if self.num_classes is None:
            return None
        labels = batch["label"].clone()
        if drop and self.label_dropout > 0:
            mask = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels[mask] = self.null_class
        return labels

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = random_shift(batch["image"], self.augment_shift) * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.alphas_cumprod.shape[0], (x0.shape[0],), device=x0.device)
        loss = self._loss(self.unet, x0, noise, t, self._labels(batch, drop=True))
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        ema = list(self.ema_unet.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.unet.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.ema_unet.buffers(), self.unet.buffers()):
            b_ema.copy_(b)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0 = batch["image"] * 2 - 1
        noise, t = per_sample_noise(batch["id"], tuple(x0.shape[1:]), self.alphas_cumprod.shape[0])
        loss = self._loss(self.ema_unet, x0, noise.to(x0), t.to(x0.device), self._labels(batch, drop=False))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def export(self, directory) -> None:
        save_diffusion(self.diffusion_model(ema=True), self.noise_scheduler, directory)

    def configure_optimizers(self) -> dict:
        return configure(self, self.unet.parameters(), self.optim_cfg)
