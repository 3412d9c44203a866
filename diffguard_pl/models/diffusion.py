"""Diffusion models: a diffusers UNet2DModel plus its noise schedule.

Checkpoints are diffusers pipeline folders (``model_index.json``, ``unet/``,
``scheduler/``), the layout of real checkpoints such as google/ddpm-cifar10-32,
so the embedded models load through exactly the same ``from_pretrained`` path.
A class-conditional model reserves its last class-embedding row as the null
class (used for classifier-free guidance); ``diffguard.json`` in the folder
records that, and a config can state it for checkpoints that lack the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffguard_pl.config import DiffusionConfig
from diffguard_pl.models.classifier import MissingCheckpointError

META_FILE = "diffguard.json"


def build_unet(cfg: DiffusionConfig, channels: int, resolution: int, num_classes: Optional[int]) -> UNet2DModel:
    """A fresh UNet2DModel; conditional models get ``num_classes + 1`` embeddings (last = null)."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=cfg.attention_head_dim,
        dropout=cfg.dropout,
        num_class_embeds=(num_classes + 1) if cfg.conditional else None,
    )


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


@dataclass
class DiffusionModel:
    """A denoiser with its schedule. Images live in [-1, 1] inside the model.

    ``num_classes`` is the number of real classes of a conditional model (None
    for unconditional); its null class id is ``null_class``.
    """

    unet: UNet2DModel
    alphas_cumprod: torch.Tensor  # [T] float64
    num_classes: Optional[int] = None
    null_class: Optional[int] = None

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def to(self, device: torch.device | str) -> "DiffusionModel":
        self.unet.to(device)
        return self

    def eps(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted noise. ``t`` is one timestep per sample; learned-sigma outputs keep the first C channels."""
        if self.conditional and class_labels is None:
            class_labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        out = self.unet(x, t, class_labels=class_labels if self.conditional else None).sample
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                "the diffusion model returned NaN or Inf; check the checkpoint and the input range ([-1, 1])"
            )
        return out


def save_diffusion(model: DiffusionModel, scheduler: DDPMScheduler, directory: str | Path) -> Path:
    directory = Path(directory)
    DDPMPipeline(unet=model.unet, scheduler=scheduler).save_pretrained(str(directory))
    meta = {"num_classes": model.num_classes, "null_class": model.null_class}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_diffusion(
    directory: str | Path, num_classes: Optional[int] = None, null_class: Optional[int] = None
) -> DiffusionModel:
    """Load a diffusers folder (pipeline layout with unet/ and scheduler/, or a bare UNet folder).

    ``num_classes`` / ``null_class`` override what ``diffguard.json`` says; for
    a conditional checkpoint without that file they default to
    ``num_class_embeds - 1`` and ``num_class_embeds - 1``.
    """
    directory = Path(directory)
    if (directory / "unet" / "config.json").is_file():
        unet_dir, scheduler_dir = directory / "unet", directory / "scheduler"
    elif (directory / "config.json").is_file():
        unet_dir, scheduler_dir = directory, directory
    else:
        raise MissingCheckpointError(
            f"No diffusers model at {directory} (expected unet/config.json or config.json). "
            f"Train one with `python train.py --config conf/train_diffusion_uncond.yaml output_dir=OUT` "
            f"and use OUT/diffusion, or convert a guided-diffusion checkpoint."
        )
    unet = UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False).eval()
    if (scheduler_dir / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(str(scheduler_dir))
    else:
        scheduler = DDPMScheduler()  # diffusers' default linear schedule, as ADM and DDPM use
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    embeds = unet.config.num_class_embeds
    if num_classes is None:
        num_classes = meta.get("num_classes", None if embeds is None else embeds - 1)
    if null_class is None:
        null_class = meta.get("null_class", None if num_classes is None else num_classes)
    if num_classes is not None and embeds is None:
        raise ValueError(f"{directory}: num_classes={num_classes} given, but the UNet has no class embedding")
    return DiffusionModel(unet, scheduler.alphas_cumprod.double(), num_classes, null_class)
