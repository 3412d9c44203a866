"""Diffusion models: a diffusers denoiser, its noise schedule and, for latent models, an autoencoder.

Checkpoints are diffusers pipeline folders, the layout of real checkpoints, so
the embedded models load through exactly the same ``from_pretrained`` path:

- pixel space: ``unet/`` (UNet2DModel) + ``scheduler/`` (e.g. google/ddpm-cifar10-32);
- latent space: a denoiser in ``unet/`` (UNet2DModel with class embeddings) or
  ``transformer/`` (DiTTransformer2DModel, e.g. facebook/DiT-XL-2-256) plus an
  autoencoder in ``vae/`` (AutoencoderKL) or ``vqvae/`` (VQModel, e.g. the LDM
  cin256 models) + ``scheduler/``. Images are encoded as
  ``(mean - shift_factor) * scaling_factor`` (the autoencoder's config) and
  decoded back for scoring.

A class-conditional UNet reserves its last class-embedding row as the null
class (used for classifier-free guidance); ``diffguard.json`` in the folder
records that, and a config can state it for checkpoints that lack the file. A
DiT's null class is ``num_embeds_ada_norm`` (the label table's extra row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import diffusers
import torch.nn as nn
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffguard_pl.config import DiffusionConfig
from diffguard_pl.errors import MissingCheckpointError
from diffguard_pl.models.files import diffusion_folders

META_FILE = "diffguard.json"
NONFINITE_EPS = "the diffusion model returned NaN or Inf; check the checkpoint and the input range ([-1, 1])"


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


def schedule_alphas_cumprod(scheduler: DDPMScheduler) -> torch.Tensor:
    """alpha_bar [T] of a scheduler's beta schedule, built in float64 from its config.

    diffusers builds betas and their cumulative product in float32; guided-diffusion builds them in float64
    (``np.linspace`` for the linear schedule, ``np.cumprod(1 - betas)``), and the two tables differ by up to
    about 4e-7, which 90 guided synthesis steps amplify into the scores. This follows guided-diffusion's
    arithmetic for the linear, scaled-linear and cosine (``squaredcos_cap_v2``) schedules and for
    ``trained_betas``, so a converted ADM checkpoint walks the levels the released code walks. Another
    schedule (sigmoid, laplace, zero-terminal-SNR rescaling) keeps diffusers' float32 betas, with a warning.
    """
    import math
    import warnings

    import numpy as np

    config = scheduler.config
    steps = int(config.num_train_timesteps)
    start, end, kind = float(config.beta_start), float(config.beta_end), config.beta_schedule
    if getattr(config, "rescale_betas_zero_snr", False):
        kind = "rescaled"
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float64)
    elif kind == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - bar((i + 1) / steps) / bar(i / steps), 0.999) for i in range(steps)])
    else:
        warnings.warn(f"beta schedule {kind!r}: alpha_bar from diffusers' float32 betas (float64 is built only "
                      f"for linear, scaled_linear, squaredcos_cap_v2 and trained_betas)", stacklevel=2)
        betas = scheduler.betas.double().numpy()
    return torch.from_numpy(np.cumprod(1.0 - betas, axis=0))


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


DENOISERS = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")
AUTOENCODERS = ("AutoencoderKL", "VQModel")


@dataclass
class DiffusionModel:
    """A denoiser with its schedule (and autoencoder for a latent model). Model space is [-1, 1] images or latents.

    ``unet`` is the denoiser: a UNet2DModel or a DiT. ``num_classes`` is the
    number of real classes of a conditional model (None for unconditional);
    its null class id is ``null_class``. ``vae`` (AutoencoderKL or VQModel)
    makes it a latent model: :meth:`encode` / :meth:`decode` map between
    images in [-1, 1] and the denoiser's space.
    """

    unet: nn.Module
    alphas_cumprod: torch.Tensor  # [T] float64
    num_classes: Optional[int] = None
    null_class: Optional[int] = None
    vae: Optional[nn.Module] = None

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def is_dit(self) -> bool:
        return "Transformer" in type(self.unet).__name__

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def in_channels(self) -> int:
        """Channels of the denoiser's input (latent channels for a latent model)."""
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        """Side of the denoiser's input (the latent side for a latent model)."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels) if self.latent else self.in_channels

    @property
    def downsampling(self) -> int:
        """Image side / denoiser side: 2 ** (autoencoder levels - 1) for a latent model, else 1."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.latent else 1

    @property
    def image_size(self) -> int:
        return self.sample_size * self.downsampling

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def to(self, device: torch.device | str) -> "DiffusionModel":
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def modules(self) -> list:
        return [m for m in (self.unet, self.vae) if m is not None]

    def _scale(self) -> tuple[float, float]:
        config = self.vae.config
        shift = getattr(config, "shift_factor", None)
        return float(getattr(config, "scaling_factor", 1.0) or 1.0), float(shift or 0.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to model space (identity for a pixel-space model).

        AutoencoderKL: the posterior mean (deterministic), VQModel: the
        pre-quantisation latents, both shifted and scaled by the config.
        """
        if not self.latent:
            return images
        scale, shift = self._scale()
        encoded = self.vae.encode(images)
        z = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return (z - shift) * scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model space to images in [-1, 1] (not clamped); identity for a pixel-space model."""
        if not self.latent:
            return z
        scale, shift = self._scale()
        images = self.vae.decode(z / scale + shift).sample
        if not torch.isfinite(images).all():
            raise FloatingPointError("the autoencoder's decoder returned NaN or Inf; check the vae checkpoint")
        return images

    def eps(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
            check_finite: bool = True) -> torch.Tensor:
        """Predicted noise. ``t`` is one timestep per sample; learned-sigma outputs keep the first C channels.

        ``check_finite=False`` leaves the NaN / Inf check to the caller (the pipeline checks once per run,
        so that its steps never wait for the device).
        """
        if self.conditional and class_labels is None:
            if self.null_class is None:
                raise ValueError("this class-conditional diffusion model has no null class: pass class labels")
            class_labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        out = self.unet(x, t, class_labels=class_labels if self.conditional else None).sample
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        if check_finite and not torch.isfinite(out).all():
            raise FloatingPointError(NONFINITE_EPS)
        return out


def save_diffusion(model: DiffusionModel, scheduler: DDPMScheduler, directory: str | Path) -> Path:
    """Write a diffusers folder: ``unet/`` or ``transformer/``, ``vae/`` or ``vqvae/``, ``scheduler/``."""
    directory = Path(directory)
    if not model.latent and not model.is_dit:
        DDPMPipeline(unet=model.unet, scheduler=scheduler).save_pretrained(str(directory))
    else:
        directory.mkdir(parents=True, exist_ok=True)
        denoiser = "transformer" if model.is_dit else "unet"
        components = {denoiser: model.unet, "scheduler": scheduler}
        if model.latent:
            components["vqvae" if type(model.vae).__name__ == "VQModel" else "vae"] = model.vae
        index = {"_class_name": "DiffGuardLatentPipeline", "_diffusers_version": diffusers.__version__}
        for name, component in components.items():
            component.save_pretrained(str(directory / name))
            index[name] = ["diffusers", type(component).__name__]
        (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    meta = {"num_classes": model.num_classes, "null_class": model.null_class}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def _load_component(directory: Path, allowed: tuple, what: str) -> nn.Module:
    name = json.loads((directory / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if name not in allowed:
        raise ValueError(f"{directory}: a {name} cannot serve as the {what}; supported: {', '.join(allowed)}")
    return getattr(diffusers, name).from_pretrained(str(directory), low_cpu_mem_usage=False).eval()


def load_diffusion(
    directory: str | Path, num_classes: Optional[int] = None, null_class: Optional[int] = None
) -> DiffusionModel:
    """Load a diffusers folder (pipeline layout, or a bare UNet folder); see the module docstring.

    ``num_classes`` / ``null_class`` override what ``diffguard.json`` says; for
    a conditional UNet checkpoint without that file they default to
    ``num_class_embeds - 1`` and ``num_class_embeds - 1``; for a DiT to
    ``num_embeds_ada_norm`` for both.
    """
    folders = diffusion_folders(directory)
    directory = folders.root
    unet = _load_component(folders.denoiser, DENOISERS, "denoiser")
    vae = None if folders.autoencoder is None else _load_component(folders.autoencoder, AUTOENCODERS, "autoencoder")
    if folders.scheduler is not None:
        scheduler = DDPMScheduler.from_pretrained(str(folders.scheduler))
    else:
        scheduler = DDPMScheduler()  # diffusers' default linear schedule, as ADM and DDPM use
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if type(unet).__name__ == "UNet2DModel":
        embeds = unet.config.num_class_embeds
        default_classes = None if embeds is None else embeds - 1
    else:
        embeds = unet.config.num_embeds_ada_norm
        default_classes = embeds
    if num_classes is None:
        num_classes = meta.get("num_classes", default_classes)
    if null_class is None:
        null_class = meta.get("null_class", None if num_classes is None else num_classes)
    if num_classes is not None and embeds is None:
        raise ValueError(f"{directory}: num_classes={num_classes} given, but the denoiser has no class embedding")
    if vae is not None and int(vae.config.latent_channels) != int(unet.config.in_channels):
        raise ValueError(
            f"{directory}: the autoencoder has {vae.config.latent_channels} latent channels but the denoiser takes "
            f"{unet.config.in_channels}"
        )
    return DiffusionModel(unet, schedule_alphas_cumprod(scheduler), num_classes, null_class, vae)
