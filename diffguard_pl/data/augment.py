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
