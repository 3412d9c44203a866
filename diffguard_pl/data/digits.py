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

import numpy as np
import torch

from diffguard_pl.config import DataConfig
from diffguard_pl.data.benchmark import IND, OOD_LABEL, Benchmark, ImageSet, name_rng, preprocess, split_ood, stratified_split
from diffguard_pl.data.generated import FAR_OOD_BUILDERS

NEAR_OOD = "digits_6to9"
FAR_OOD = tuple(FAR_OOD_BUILDERS)  # textures, faces, photos, noise, constant (diffguard_pl/data/generated.py)


def _load_digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
    return images, digits.target.astype(np.int64)


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
        class_names=[str(c) for c in cfg.ind_classes],  # label k is the digit ind_classes[k]
    )

    near_idx = np.flatnonzero(np.isin(targets, cfg.near_ood_classes))
    rng = name_rng(cfg.seed, NEAR_OOD)
    if len(near_idx) > cfg.ood_samples_per_set:
        near_idx = np.sort(rng.choice(near_idx, cfg.ood_samples_per_set, replace=False))
    near = ImageSet(
        NEAR_OOD, preprocess(images[near_idx], res, ch), [OOD_LABEL] * len(near_idx), [ids[i] for i in near_idx]
    )
    benchmark.ood[NEAR_OOD] = split_ood(NEAR_OOD, "near", near, cfg.seed, cfg.ood_val_fraction)

    n = cfg.ood_samples_per_set
    for name, build in FAR_OOD_BUILDERS.items():
        far_images = build(n, name_rng(cfg.seed, name), res, ch)
        far = ImageSet(name, far_images, [OOD_LABEL] * n, [f"{name}/{k:04d}" for k in range(n)])
        benchmark.ood[name] = split_ood(name, "far", far, cfg.seed, cfg.ood_val_fraction)
    return benchmark
