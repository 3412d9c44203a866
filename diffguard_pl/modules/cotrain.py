"""What co-training and joint training share: the diffusion model's clean estimates of noised images.

An image x0 in [0, 1] is mapped to the model's [-1, 1], noised to
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps_true with a = alpha_bar of the
diffusion model's training schedule, and the model's clean estimate

    x0_pred = (x_t - sqrt(1 - a_t) eps(x_t)) / sqrt(a_t)          (clean = "x0_pred")
    f x0_pred + (1 - f) x_t, f = sqrt(1 - a_t)                     (clean = "blend", what guidance feeds)

is mapped back with (x + 1) / 2. It is not clamped unless asked: classifier
guidance feeds the classifier the unclamped estimate, and a classifier trained
on clamped estimates would see a different input distribution there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import DDPMScheduler

from diffguard_pl.config import ConfigError, CoTrainConfig
from diffguard_pl.seeding import sample_seed
from diffguard_pl.method.ddim import predict_x0
from diffguard_pl.models.diffusion import DiffusionModel, load_diffusion
from diffguard_pl.models.files import diffusion_folders

# Salt of the per-sample noise of the x0_pred validation accuracy (distinct from DiffusionModule's val/loss, salt 0).
VAL_SALT = 8


def noise_images(images: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, a_t): images in [0, 1] mapped to [-1, 1] and noised to per-sample timesteps ``t``."""
    a = alphas_cumprod.to(images.device)[t].to(images.dtype).view(-1, 1, 1, 1)
    x0 = images * 2 - 1
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, a


def clean_estimates(diffusion: DiffusionModel, alphas_cumprod: torch.Tensor, images: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, clean: str = "x0_pred", clamp: bool = False) -> torch.Tensor:
    """The diffusion model's clean estimate of each noised image, in [0, 1] (unclamped unless ``clamp``).

    Gradients flow through the UNet when the caller has them enabled (joint
    training); co-training calls it under ``torch.no_grad``.
    """
    x_t, a = noise_images(images, alphas_cumprod, t, noise)
    eps = diffusion.eps(x_t, t)
    estimate = predict_x0(x_t, eps, a.view(-1))
    if clean == "blend":
        f = (1 - a).sqrt()
        estimate = f * estimate + (1 - f) * x_t
    if clamp:
        estimate = estimate.clamp(-1, 1)
    return (estimate + 1) / 2


def random_timesteps(n: int, cfg: CoTrainConfig, device: torch.device) -> torch.Tensor:
    return torch.randint(cfg.t_min, cfg.t_max + 1, (n,), device=device)


def seeded_noise(ids: Sequence[str], shape: tuple, salt: int, t_range: Optional[tuple[int, int]] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Noise (and timesteps in ``t_range``, inclusive) that depend only on each sample's id and ``salt``."""
    noise, steps = [], []
    for sample_id in ids:
        g = torch.Generator().manual_seed(sample_seed(sample_id, salt))
        noise.append(torch.randn(shape, generator=g))
        if t_range is not None:
            steps.append(torch.randint(t_range[0], t_range[1] + 1, (1,), generator=g))
    return torch.stack(noise), (torch.cat(steps) if steps else None)


def check_timesteps(cfg: CoTrainConfig, num_train_timesteps: int) -> None:
    if cfg.t_max >= num_train_timesteps:
        raise ConfigError(f"cotrain.t_max={cfg.t_max} must be below the diffusion model's "
                          f"{num_train_timesteps} training timesteps")


def load_diffusion_with_scheduler(directory: str | Path) -> tuple[DiffusionModel, DDPMScheduler]:
    """A pixel-space diffusers folder as a :class:`DiffusionModel` plus the scheduler to save it with again."""
    model = load_diffusion(directory)
    if model.latent:
        raise ConfigError(f"cotrain.diffusion_path={directory} is a latent diffusion model; co-training and joint "
                          f"training need a pixel-space one (the classifier reads x0_pred as an image)")
    folder = diffusion_folders(directory).scheduler
    return model, DDPMScheduler() if folder is None else DDPMScheduler.from_pretrained(str(folder))
