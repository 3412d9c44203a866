"""Optimiser and learning-rate schedule from an :class:`OptimConfig`."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from diffguard_pl.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> dict:
    """Linear warmup, then cosine decay to zero at ``total_steps`` (or constant). Stepped per batch."""
    warmup = max(cfg.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant" or total_steps <= warmup:
            return 1.0
        progress = min((step - warmup) / (total_steps - warmup), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": schedule, "interval": "step"}


def configure(module, params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> dict:
    """For ``LightningModule.configure_optimizers``: total steps come from the trainer."""
    optimizer = build_optimizer(params, cfg)
    total = int(module.trainer.estimated_stepping_batches)
    return {"optimizer": optimizer, "lr_scheduler": build_scheduler(optimizer, cfg, total)}
