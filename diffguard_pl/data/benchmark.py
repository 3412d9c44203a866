"""Benchmark structure shared by every data source.

A benchmark is an in-distribution (InD) set with train / val / test splits and
named OOD sets, each in the ``near`` or ``far`` group with val / test splits.
Every sample is a dict ``{"image", "label", "id", "set", "split"}``: ``image``
is a float tensor [C, H, W] in [0, 1], ``label`` the class (-1 for OOD), ``id``
a stable string, ``set`` the set name and ``split`` train, val or test. Per-sample randomness is seeded from the id
(:func:`sample_seed`), never from batch position or process rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffguard_pl.seeding import sample_seed

IND = "ind"
OOD_LABEL = -1


def name_rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded from names, so each set's randomness is independent."""
    return np.random.default_rng(sample_seed(":".join(map(str, parts))))


class ImageSet(Dataset):
    """An in-memory set of preprocessed images with labels and stable ids."""

    def __init__(
        self, name: str, images: torch.Tensor, labels: Sequence[int], ids: Sequence[str], split: str = "test"
    ):
        if images.ndim != 4:
            raise ValueError(f"set {name}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if not (len(images) == len(labels) == len(ids)):
            raise ValueError(f"set {name}: {len(images)} images, {len(labels)} labels, {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError(f"set {name}: sample ids are not unique")
        self.name, self.split = name, split
        self.images = images.float().contiguous()
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "id": self.ids[index],
            "set": self.name,
            "split": self.split,
        }

    def subset(self, indices: Sequence[int], split: str | None = None) -> "ImageSet":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        ids = [self.ids[i] for i in idx.tolist()]
        return ImageSet(self.name, self.images[idx], self.labels[idx].tolist(), ids, split or self.split)

    @classmethod
    def pooled(cls, name: str, sets: Sequence["ImageSet"], split: str) -> "ImageSet":
        """The sets as one (their samples in order, ids kept)."""
        return cls(name, torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]).tolist(),
                   [i for s in sets for i in s.ids], split)


@dataclass
class OODSet:
    group: str  # "near" or "far"
    val: ImageSet
    test: ImageSet


@dataclass
class Benchmark:
    name: str
    num_classes: int
    channels: int
    resolution: int
    train: ImageSet
    val: ImageSet
    test: ImageSet
    ood: Dict[str, OODSet] = field(default_factory=dict)
    class_names: Optional[List[str]] = None  # per InD label (its position in data.ind_classes); None: unknown

    def ood_names(self, group: str | None = None) -> List[str]:
        return [name for name, s in self.ood.items() if group is None or s.group == group]

    def all_sets(self) -> Iterator[tuple[str, str, ImageSet]]:
        """(split, set name, set) for every split of every set."""
        for split in ("train", "val", "test"):
            yield split, IND, getattr(self, split)
        for name, s in self.ood.items():
            yield "val", name, s.val
            yield "test", name, s.test


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert [N, 1 or 3, H, W] images to the requested channel count."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).clone()
    if have == 3 and channels == 1:
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels (use 1 or 3)")


def preprocess(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """The one preprocessing every set goes through: channels, square resize, [0, 1] clamp.

    ``images`` is [N, C, H, W] (C = 1 or 3) in [0, 1] at its native size.
    """
    images = to_channels(images.float(), channels)
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return images.clamp(0.0, 1.0)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> List[np.ndarray]:
    """Split indices into len(fractions) + 1 disjoint parts, per class, in fixed order.

    The last part takes what the fractions leave. Each part is sorted.
    """
    parts: List[List[int]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for k, frac in enumerate(fractions):
            count = int(round(frac * len(idx)))
            parts[k].extend(idx[start : start + count].tolist())
            start += count
        parts[-1].extend(idx[start:].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_ood(name: str, group: str, data: ImageSet, seed: int, val_fraction: float) -> OODSet:
    """An OOD set's val / test split: ``val_fraction`` of its samples (a permutation fixed by the set's name and
    ``seed``) for validation, the rest for test; both keep the set's order."""
    order = name_rng(seed, name, "ood-split").permutation(len(data))
    n_val = int(round(val_fraction * len(data)))
    return OODSet(group, data.subset(np.sort(order[:n_val]), "val"), data.subset(np.sort(order[n_val:]), "test"))
