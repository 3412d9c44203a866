"""The embedded Digits-OOD benchmark: built from data that installed packages carry.

- InD: scikit-learn's digits (8x8), ``ind_classes`` (default 0-5), stratified
  train / val / test splits.
- near-OOD ``digits_6to9``: the digits the classifier never sees.
- far-OOD ``textures`` (patches of scikit-image's brick, grass and gravel),
  ``faces`` (crops of scikit-image's LFW subset), ``photos`` (patches of
  scikit-learn's sample photos), ``noise`` (Gaussian noise) and ``constant``
  (single-value images: the monochrome failure case of the paper).

Nothing is downloaded; the same config and seed give bit-identical sets.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np
import torch

from diffguard_pl.config import DataConfig
from diffguard_pl.data.benchmark import (
    IND,
    OOD_LABEL,
    Benchmark,
    ImageSet,
    OODSet,
    name_rng,
    preprocess,
    stratified_split,
)

NEAR_OOD = "digits_6to9"
FAR_OOD = ("textures", "faces", "photos", "noise", "constant")


def _load_digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
    return images, digits.target.astype(np.int64)


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


def _split_ood(name: str, group: str, data: ImageSet, cfg: DataConfig) -> OODSet:
    order = name_rng(cfg.seed, name, "ood-split").permutation(len(data))
    n_val = int(round(cfg.ood_val_fraction * len(data)))
    return OODSet(group, data.subset(np.sort(order[:n_val]), "val"), data.subset(np.sort(order[n_val:]), "test"))


def build_digits_benchmark(cfg: DataConfig) -> Benchmark:
    images, targets = _load_digits()
    res, ch = cfg.resolution, cfg.channels
    ids = [f"digits/{i:04d}" for i in range(len(targets))]

    ind_idx = np.flatnonzero(np.isin(targets, cfg.ind_classes))
    # Labels are the position in ind_classes, so the classifier sees 0..K-1.
    remap = {c: k for k, c in enumerate(cfg.ind_classes)}
    ind_labels = np.array([remap[c] for c in targets[ind_idx]])
    val_part, test_part, train_part = stratified_split(
        ind_labels, [cfg.val_fraction, cfg.test_fraction], name_rng(cfg.seed, "ind-split")
    )
    ind_images = preprocess(images[ind_idx], res, ch)

    def ind_set(part: np.ndarray, split: str) -> ImageSet:
        return ImageSet(IND, ind_images[part], ind_labels[part].tolist(), [ids[ind_idx[i]] for i in part], split)

    benchmark = Benchmark(
        name="digits",
        num_classes=len(cfg.ind_classes),
        channels=ch,
        resolution=res,
        train=ind_set(train_part, "train"),
        val=ind_set(val_part, "val"),
        test=ind_set(test_part, "test"),
    )

    near_idx = np.flatnonzero(np.isin(targets, cfg.near_ood_classes))
    rng = name_rng(cfg.seed, NEAR_OOD)
    if len(near_idx) > cfg.ood_samples_per_set:
        near_idx = np.sort(rng.choice(near_idx, cfg.ood_samples_per_set, replace=False))
    near = ImageSet(
        NEAR_OOD, preprocess(images[near_idx], res, ch), [OOD_LABEL] * len(near_idx), [ids[i] for i in near_idx]
    )
    benchmark.ood[NEAR_OOD] = _split_ood(NEAR_OOD, "near", near, cfg)

    n = cfg.ood_samples_per_set
    for name, build in FAR_OOD_BUILDERS.items():
        far_images = build(n, name_rng(cfg.seed, name), res, ch)
        far = ImageSet(name, far_images, [OOD_LABEL] * n, [f"{name}/{k:04d}" for k in range(n)])
        benchmark.ood[name] = _split_ood(name, "far", far, cfg)
    return benchmark
