"""LightningModule that fine-tunes a classifier and a diffusion model together (task=joint)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffguard_pl.config import CoTrainConfig, OptimConfig
from diffguard_pl.data.augment import random_shift
from diffguard_pl.models.classifier import ClassifierSpec, save_classifier
from diffguard_pl.models.diffusion import DiffusionModel, save_diffusion
from diffguard_pl.modules.classifier_module import ClassifierModule
from diffguard_pl.modules.cotrain import noise_images
from diffguard_pl.modules.diffusion_module import per_sample_noise
from diffguard_pl.modules.optim import build_optimizer, build_scheduler


class JointModule(ClassifierModule):
    """Joint optimisation of classifier and diffusion model, two optimisers, manual optimisation.

    Each step, on one augmented batch of InD training images with labels y:

    - the UNet's denoising loss, as :class:`DiffusionModule` computes it (eps MSE
      at timesteps uniform over the whole schedule; a conditional model's labels
      dropped to the null class with ``label_dropout``);
    - clean estimates x0_pred(x_t) at timesteps uniform in [t_min, t_max], with
      the graph through the UNet kept, classified together with the real images;
    - UNet loss: ``denoising + cotrain.ce_weight * CE(classifier(x0_pred), y)``,
      its gradient applied to the UNet only;
    - classifier loss: ``(1 - w) * CE(real) + w * CE(x0_pred)`` as in co-training,
      its gradient applied to the classifier only.

    ``trainer.global_step`` counts batches (the diffusion optimiser's step is not
    counted), so ``trainer.max_steps`` means the same as for the other tasks.
    An EMA of the UNet (``cotrain.ema_decay``, starting at the loaded weights;
    0 = none) is used for validation and exported. ``export(root)`` writes
    ``root/classifier`` (portable classifier) and ``root/diffusion`` (diffusers folder).
    """

    def __init__(
        self,
        spec: ClassifierSpec,
        optim: OptimConfig,
        diffusion: DiffusionModel,
        scheduler: DDPMScheduler,
        cotrain: Optional[CoTrainConfig] = None,
        pretrained_path: Optional[str] = None,
        label_smoothing: float = 0.0,
        augment_shift: int = 0,
        label_dropout: float = 0.1,
    ):
        super().__init__(spec, optim, pretrained_path, label_smoothing, augment_shift, diffusion, cotrain)
        self.automatic_optimization = False
        self.train_diffusion = True
        self.unet.requires_grad_(True).train()
        self.noise_scheduler = scheduler
        self.label_dropout = label_dropout
        decay = self.cotrain_cfg.ema_decay
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval() if decay > 0 else None

    def train(self, mode: bool = True) -> "JointModule":
        super().train(mode)
        if getattr(self, "ema_unet", None) is not None:
            self.ema_unet.eval()
        return self

    def diffusion_model(self, ema: bool = True) -> DiffusionModel:
        unet = self.ema_unet if ema and self.ema_unet is not None else self.unet
        return DiffusionModel(unet, self.alphas_cumprod.double(), self.diffusion_num_classes, self.diffusion_null_class)

    def _denoising_loss(self, unet, images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        labels: Optional[torch.Tensor]) -> torch.Tensor:
        x_t, _ = noise_images(images, self.alphas_cumprod, t, noise)
        pred = unet(x_t, t, class_labels=labels).sample
        return F.mse_loss(pred[:, : images.shape[1]], noise)

    def _diffusion_labels(self, labels: torch.Tensor, drop: bool) -> Optional[torch.Tensor]:
        if self.diffusion_num_classes is None:
            return None
        labels = labels.clone()
        if drop and self.label_dropout > 0:
            labels[torch.rand(labels.shape, device=labels.device) < self.label_dropout] = self.diffusion_null_class
        return labels

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt_c, opt_d = self.optimizers()
        sched_c, sched_d = self.lr_schedulers()
        images = random_shift(batch["image"], self.augment_shift)
        labels = batch["label"]
        n = images.shape[0]

        t = torch.randint(0, self.alphas_cumprod.shape[0], (n,), device=images.device)
        denoising = self._denoising_loss(self.unet, images, torch.randn_like(images), t,
                                         self._diffusion_labels(labels, drop=True))
        estimates = self.clean_images(images, self.diffusion_model(ema=False))  # graph through the UNet kept
        out = self.classifier_losses(images, estimates, labels)
        unet_loss = denoising + self.cotrain_cfg.ce_weight * F.cross_entropy(out["logits_x0"], labels)

        opt_c.zero_grad()
        opt_d.zero_grad()
        self.manual_backward(unet_loss, inputs=[p for p in self.unet.parameters() if p.requires_grad],
                             retain_graph=True)
        self.manual_backward(out["loss"], inputs=[p for p in self.classifier.parameters() if p.requires_grad])
        # The diffusion optimiser steps through the strategy (precision plugin included) but is not counted
        # in trainer.global_step, so that one batch is one step as for the other tasks.
        self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
        opt_c.step()
        sched_d.step()
        sched_c.step()
        self._update_ema()

        self._log_train(n, out["loss"], out["logits"], labels, out)
        self.log("train/denoising", denoising, prog_bar=True, batch_size=n)
        self.log("train/unet_loss", unet_loss, batch_size=n)
        return out["loss"]

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_unet is None:
            return
        ema = list(self.ema_unet.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.unet.parameters()], 1.0 - self.cotrain_cfg.ema_decay)
        for b_ema, b in zip(self.ema_unet.buffers(), self.unet.buffers()):
            b_ema.copy_(b)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        images = batch["image"]
        noise, t = per_sample_noise(batch["id"], tuple(images.shape[1:]), self.alphas_cumprod.shape[0])
        model = self.diffusion_model(ema=True)
        loss = self._denoising_loss(model.unet, images, noise.to(images), t.to(images.device),
                                    self._diffusion_labels(batch["label"], drop=False))
        self.log("val/denoising", loss, prog_bar=True, sync_dist=True, batch_size=images.shape[0])

    def export(self, directory) -> None:
        """``directory/classifier`` and ``directory/diffusion`` (the EMA UNet if kept), both portable."""
        directory = Path(directory)
        save_classifier(self.classifier, directory / "classifier")
        save_diffusion(self.diffusion_model(ema=True), self.noise_scheduler, directory / "diffusion")

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        c = self.cotrain_cfg
        diffusion_optim = OptimConfig(**{**vars(self.optim_cfg), "name": "adamw", "lr": c.diffusion_lr,
                                         "weight_decay": c.diffusion_weight_decay})
        opt_c = build_optimizer(self.classifier.parameters(), self.optim_cfg)
        opt_d = build_optimizer(self.unet.parameters(), diffusion_optim)
        return ([opt_c, opt_d],
                [build_scheduler(opt_c, self.optim_cfg, total), build_scheduler(opt_d, diffusion_optim, total)])
