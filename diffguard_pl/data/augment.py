"""Label-preserving training augmentation on image batches."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge padding), a label-preserving augmentation."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def random_resized_crop(images: torch.Tensor, min_scale: float, flip: bool,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random square crop of each image (area fraction in [min_scale, 1], anywhere inside it), resized back
    bilinearly, and mirrored left-right with probability 1/2 when ``flip``."""
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    side = (min_scale + (1 - min_scale) * u[:, 0]).sqrt()  # of the image side
    centre_x, centre_y = (2 * u[:, 1] - 1) * (1 - side), (2 * u[:, 2] - 1) * (1 - side)
    mirror = torch.where((u[:, 3] < 0.5) & flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = side * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = side, centre_y
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="border", align_corners=False)


def random_photometric(images: torch.Tensor, strength: float, blur_probability: float,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Contrast and brightness jitter (factor in [1 - s, 1 + s], shift in [-s / 2, s / 2]), then a 3 x 3
    Gaussian blur (sigma in [0.3, 1.2]) with probability ``blur_probability``; images in [0, 1] stay there."""
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64).to(device=images.device, dtype=images.dtype)
    contrast = (1 + strength * (2 * u[:, 0] - 1)).view(-1, 1, 1, 1)
    shift = (strength * (u[:, 1] - 0.5)).view(-1, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = ((images - mean) * contrast + mean + shift).clamp(0, 1)
    sigma = 0.3 + 0.9 * u[:, 2]
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3)
                     / (2 * sigma.view(-1, 1) ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)  # [n, 3]
    kernels = (taps.view(n, 3, 1) * taps.view(n, 1, 3)).unsqueeze(1)  # [n, 1, 3, 3]
    c = images.shape[1]
    blurred = F.conv2d(F.pad(out, [1] * 4, mode="replicate").view(1, n * c, *[s + 2 for s in out.shape[-2:]]),
                       kernels.repeat_interleave(c, dim=0), groups=n * c).view_as(out)
    blur = (u[:, 3] < blur_probability).view(-1, 1, 1, 1)
    return torch.where(blur, blurred, out)
