"""Generated far-OOD sets shared by the embedded benchmarks, all from data that installed packages carry.

``textures`` (patches of scikit-image's brick, grass and gravel), ``faces`` (crops of scikit-image's LFW
subset), ``photos`` (patches of scikit-learn's sample photos), ``noise`` (Gaussian noise drawn at 8x8, so it is
not separable by resolution alone) and ``constant`` (single-value images: the paper's monochrome failure case).
Each builder takes (count, generator, resolution, channels) and returns [count, channels, resolution,
resolution] images in [0, 1]; the same generator state gives bit-identical images.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np
import torch

from diffguard_pl.data.benchmark import preprocess


def _random_patches(image: np.ndarray, count: int, rng: np.random.Generator, lo: int, hi: int) -> List[torch.Tensor]:
    """Square crops of random side in [lo, hi] from an [H, W] or [H, W, 3] array in [0, 1]."""
    h, w = image.shape[:2]
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    patches = []
    for _ in range(count):
        side = int(rng.integers(lo, min(hi, h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patches.append(tensor[:, top : top + side, left : left + side])
    return patches


def _resize_each(patches: List[torch.Tensor], resolution: int, channels: int) -> torch.Tensor:
    return torch.cat([preprocess(p.unsqueeze(0), resolution, channels) for p in patches])


def _textures(n: int, rng: np.random.Generator, resolution: int, channels: int) -> torch.Tensor:
    import skimage.data

    sources = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()]
    which = rng.integers(0, len(sources), size=n)
    patches = []
    for k in range(len(sources)):
        patches += _random_patches(sources[k] / 255.0, int((which == k).sum()), rng, 24, 96)
    return _resize_each(patches, resolution, channels)


def _faces(n: int, rng: np.random.Generator, resolution: int, channels: int) -> torch.Tensor:
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the first 100 of the 200 images are faces
    picks = rng.integers(0, len(faces), size=n)
    patches = [p for i in picks for p in _random_patches(faces[i], 1, rng, 16, 25)]
    return _resize_each(patches, resolution, channels)


def _photos(n: int, rng: np.random.Generator, resolution: int, channels: int) -> torch.Tensor:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    which = rng.integers(0, len(photos), size=n)
    patches = []
    for k, photo in enumerate(photos):
        patches += _random_patches(photo / 255.0, int((which == k).sum()), rng, 24, 128)
    return _resize_each(patches, resolution, channels)


def _noise(n: int, rng: np.random.Generator, resolution: int, channels: int) -> torch.Tensor:
    # Drawn at the digits' native 8x8 scale, so it is not separable by resolution alone.
    values = rng.normal(0.5, 0.3, size=(n, 1, 8, 8)).clip(0.0, 1.0).astype(np.float32)
    return preprocess(torch.from_numpy(values), resolution, channels)


def _constant(n: int, rng: np.random.Generator, resolution: int, channels: int) -> torch.Tensor:
    values = rng.uniform(0.0, 1.0, size=(n, 1, 1, 1)).astype(np.float32)
    return preprocess(torch.from_numpy(values).expand(n, 1, 8, 8), resolution, channels)


FAR_OOD_BUILDERS: Dict[str, Callable[[int, np.random.Generator, int, int], torch.Tensor]] = {
    "textures": _textures,
    "faces": _faces,
    "photos": _photos,
    "noise": _noise,
    "constant": _constant,
}
