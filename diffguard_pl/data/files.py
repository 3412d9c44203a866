"""Benchmarks from image files: OpenOOD v1.5 image lists and plain folders.

Everything here is lazy: a :class:`FileImageSet` holds paths, labels and ids
and decodes one image (with PIL) per ``__getitem__``, so a 50k-image test set
or ImageNet's 1.28M-image train list costs only the list in memory. A sample is
the same dict as :class:`~diffguard_pl.data.benchmark.ImageSet`'s:
``{"image": float [C, H, W] in [0, 1], "label", "id", "set", "split"}``; the id
is the image's path relative to its data folder (as written in the list), so
per-sample seeding (:func:`~diffguard_pl.data.benchmark.sample_seed`) does not
depend on where the data lives.

Image lists (OpenOOD v1.5, ``benchmark_imglist/<benchmark>/<split>_<set>.txt``)
hold one ``relative/path label`` per line, the label a class index or -1 for
OOD, the path relative to a data folder (``images_classic/`` or
``images_largescale/`` under the data root). Blank lines and lines starting
with ``#`` are ignored. The line is split at its *last* whitespace, so a path
may contain spaces (OpenOOD itself splits at the first space; for its own lists,
whose paths have none, the two agree).

Errors. Anything wrong with a list line (no label, a non-integer label, a label
below -1, a missing file, a duplicate) or an image (undecodable, truncated,
grayscale in an RGB benchmark without ``convert_grayscale``) raises a
:class:`DataError` that names the list file, the line and what to fix. With
``on_error="skip"`` such lines and images are dropped and returned as
:class:`Problem` records (for results.json, see :func:`data_report`). A lazy set
cannot drop a sample when it is fetched without silently changing the set, so
skip mode first runs :func:`verify` over every image (open, ``verify()``, full
decode) and builds the set from what is left. In raise mode files are decoded
only when used (``verify_files=True`` checks them all up front instead), and a
bad one raises when it is reached.

Colour. RGB benchmarks: colour modes other than RGB (RGBA, CMYK, YCbCr, P with
a colour palette, ...) go through PIL's ``convert("RGB")``; RGBA's alpha channel
is dropped (transparent pixels keep their stored colour), not composited on a
background. Grayscale images (modes 1, L, LA,
I, I;16, F, or P with a gray palette) are an error unless
``convert_grayscale=True`` (the config's ``allow_grayscale: true``), which
replicates the gray channel; :func:`verify` counts them. 1-channel benchmarks
convert everything to "L" (ITU-R 601 luma, the weights of
:func:`~diffguard_pl.data.benchmark.to_channels`). 16-bit and float images are
scaled to 8 bits before conversion rather than clipped.

Resolution. A set returns images at one resolution, the diffusion model's
(``Benchmark.resolution``). The classifier may run at another:
:meth:`diffguard_pl.models.classifier.Classifier.prepare` resizes its input to
the classifier's ``input_size`` (bilinear, antialiased) before normalising, so
nothing here depends on the classifier. Note that this differs from OpenOOD's
classifier input for ImageNet (resize 256, centre crop 224): here the
classifier sees the whole diffusion-resolution crop, resized.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffguard_pl.data.benchmark import IND, OOD_LABEL, Benchmark, OODSet

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ON_ERROR = ("raise", "skip")
# What PIL raises on broken files (UnidentifiedImageError is an OSError; verify() raises SyntaxError for bad PNGs).
DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, Image.DecompressionBombError
)
GRAYSCALE_FIX = (
    "set data.allow_grayscale=true to convert grayscale images to RGB, "
    "or fix the list / replace the image"
)

PathLike = str | os.PathLike
Transform = Callable[[Image.Image], torch.Tensor]


from diffguard_pl.errors import DataError  # noqa: E402,F401  (re-exported: a list line, image or definition)


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One image: where it is, its label, its id, and (from a list) where it was listed."""

    path: str
    id: str
    label: int
    list_file: str | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        """The image path, after its list file and line when it came from a list."""
        return f"{self.list_file}:{self.line}: {self.path}" if self.list_file is not None else self.path


@dataclass(frozen=True)
class Problem:
    """A dropped list line or image. ``file`` is the list file (or the image, for folder entries)."""

    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line is not None else f"{self.file}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")


def _problem_for(entry: ImageEntry, reason: str) -> Problem:
    if entry.list_file is not None:
        return Problem(entry.list_file, entry.line, f"{entry.path}: {reason}")
    return Problem(entry.path, None, reason)


# --------------------------------------------------------------------------- lists and folders


def read_image_list(
    list_path: PathLike, data_root: PathLike, *, on_error: str = "raise", check_files: bool = True
) -> tuple[list[ImageEntry], list[Problem]]:
    """Parse an OpenOOD-style image list; paths are relative to ``data_root``.

    Returns the entries in list order and the problems (always empty with
    ``on_error="raise"``, which raises :class:`DataError` at the first bad
    line instead). ``check_files=False`` skips the existence check (one
    ``stat`` per line) for lists on slow file systems; missing files then
    fail when they are read.
    """
    _check_on_error(on_error)
    list_path, data_root = Path(list_path), Path(data_root)
    if not list_path.is_file():
        raise DataError(
            f"image list {list_path} not found: check the data root and that the lists "
            "(OpenOOD's benchmark_imglist) were downloaded and extracted there"
        )
    entries: list[ImageEntry] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    with open(list_path, encoding="utf-8-sig") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            reason = None
            parts = text.rsplit(None, 1)
            if len(parts) < 2:
                reason = "no label; each line must be '<relative/path> <label>' (an integer label, -1 for OOD)"
            else:
                rel, label_text = parts[0].strip(), parts[1]
                try:
                    label = int(label_text)
                except ValueError:
                    label = None
                    reason = (f"label {label_text!r} is not an integer; each line must be "
                              "'<relative/path> <label>' (an integer label, -1 for OOD)")
                if reason is None and label < OOD_LABEL:
                    reason = f"label {label} < -1; labels are class indices >= 0, or -1 for OOD images"
                elif reason is None and os.path.isabs(rel):
                    reason = f"absolute path; paths must be relative to the data folder {data_root}"
                elif reason is None and rel in first_line:
                    reason = f"duplicate of line {first_line[rel]}; remove one of them"
                elif reason is None and check_files and not (data_root / rel).is_file():
                    reason = (f"image {data_root / rel} does not exist; check the data root and that the "
                              "dataset was extracted there, or remove the line")
            if reason is not None:
                problem = Problem(str(list_path), number, f"{reason} (line: {text!r})")
                if on_error == "raise":
                    raise DataError(str(problem))
                problems.append(problem)
                continue
            first_line[rel] = number
            entries.append(ImageEntry(str(data_root / rel), rel, label, str(list_path), number))
    return entries, problems


def folder_classes(folder: PathLike) -> list[str]:
    """The class sub-folder names of ``folder``, sorted: their positions are the labels."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_folder(
    folder: PathLike,
    *,
    label: int = OOD_LABEL,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    class_folders: bool = False,
    id_prefix: str = "",
) -> list[ImageEntry]:
    """Every image under ``folder`` (recursive, sorted by relative path; hidden files skipped).

    Ids are ``id_prefix`` + the path relative to ``folder``. With
    ``class_folders=True`` each image's label is the position of its
    top-level sub-folder in :func:`folder_classes` (``label`` is ignored) and
    images directly in ``folder`` are an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(folder)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(exts):
                found.append((rel_dir / name).as_posix())
    found.sort()
    if not found:
        raise DataError(f"no images ({', '.join(exts)}) under {folder}")
    classes = {name: k for k, name in enumerate(folder_classes(folder))} if class_folders else {}
    entries = []
    for rel in found:
        if class_folders:
            top = rel.split("/", 1)[0]
            if "/" not in rel or top not in classes:
                raise DataError(f"{folder / rel} is not inside a class sub-folder of {folder} (class_folders=True)")
            item_label = classes[top]
        else:
            item_label = label
        entries.append(ImageEntry(str(folder / rel), id_prefix + rel, item_label))
    return entries


# --------------------------------------------------------------------------- decoding and colour


_GRAY_MODES = {"1", "L", "LA", "I", "F"}


def is_grayscale(image: Image.Image) -> bool:
    """Whether an image has no colour: a gray mode, or a palette whose used colours are all gray."""
    if image.mode in _GRAY_MODES or image.mode.startswith("I;"):
        return True
    if image.mode in ("P", "PA"):
        rgb = np.asarray(image.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float gray images to "L" by scaling (PIL's convert would clip at 255)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;"):
        return image.convert("L")
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F" and top <= 1.0:
        scale = 255.0
    elif top > 255.0:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def to_mode(image: Image.Image, channels: int, convert_grayscale: bool, where: str) -> Image.Image:
    """``image`` as "RGB" (channels=3) or "L" (channels=1), by the rules in the module docstring."""
    if channels == 1:
        if image.mode == "L":
            return image
        if image.mode in _GRAY_MODES or image.mode.startswith("I;"):
            return _to_8bit_gray(image)
        return (image if image.mode == "RGB" else image.convert("RGB")).convert("L")
    if channels != 3:
        raise ValueError(f"channels={channels}: use 1 or 3")
    if is_grayscale(image):
        if not convert_grayscale:
            raise DataError(f"{where}: grayscale image (mode {image.mode}) in an RGB benchmark; {GRAYSCALE_FIX}")
        return _to_8bit_gray(image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An "L" or "RGB" PIL image as a float tensor [C, H, W] in [0, 1]."""
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def _decode(path: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()  # closing the file releases the decoded data of ``image`` itself


# --------------------------------------------------------------------------- preprocessing

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def _resample(name: str) -> Image.Resampling:
    if name not in _RESAMPLE:
        raise ValueError(f"interpolation={name!r}: use one of {', '.join(_RESAMPLE)}")
    return _RESAMPLE[name]


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Resize the shorter side to ``resize`` (aspect kept), then centre-crop ``crop`` x ``crop``.

    The sizes and rounding follow torchvision's ``Resize(int)`` + ``CenterCrop``
    (OpenOOD's test preprocessing: 32 / 32 for CIFAR, 256 / 224 for ImageNet).
    PIL's resize filters are antialiased when downscaling.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"resize={self.resize}, crop={self.crop}: need resize >= crop >= 1")
        _resample(self.interpolation)

    @property
    def output_size(self) -> int:
        return self.crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:
            new_short, new_long = self.resize, int(self.resize * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize(size, _resample(self.interpolation))
            w, h = image.size
        top, left = round((h - self.crop) / 2.0), round((w - self.crop) / 2.0)
        return to_tensor(image.crop((left, top, left + self.crop, top + self.crop)))


@dataclass(frozen=True)
class SquareResize:
    """Resize to ``size`` x ``size``, ignoring the aspect ratio (e.g. 32 x 32 for CIFAR-style sets)."""

    size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size={self.size} must be >= 1")
        _resample(self.interpolation)

    @property
    def output_size(self) -> int:
        return self.size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), _resample(self.interpolation))
        return to_tensor(image)


TRANSFORM_KINDS = ("resize_center_crop", "resize")
StandardTransform = ResizeCenterCrop | SquareResize


def standard_transform(
    kind: str, size: int, *, resize: int | None = None, interpolation: str = "bilinear"
) -> StandardTransform:
    """A preprocessing transform that gives ``size`` x ``size`` images.

    - ``"resize_center_crop"``: shorter side to ``resize`` (default ``size``: a
      square centre crop of the whole short side), then centre crop ``size``.
      ImageNet/OpenOOD style: ``standard_transform("resize_center_crop", 224, resize=256)``.
    - ``"resize"``: straight to ``size`` x ``size`` (``resize`` must be unset).
    """
    if kind == "resize_center_crop":
        return ResizeCenterCrop(size if resize is None else resize, size, interpolation)
    if kind == "resize":
        if resize is not None:
            raise ValueError("standard_transform('resize', ...) takes no resize=; it resizes straight to size")
        return SquareResize(size, interpolation)
    raise ValueError(f"unknown transform kind {kind!r}: use one of {', '.join(TRANSFORM_KINDS)}")


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyResult:
    """What :func:`verify` kept, what it dropped, and which kept ids are grayscale images converted to RGB."""

    entries: list[ImageEntry]
    problems: list[Problem]
    grayscale: list[str]


def _inspect(entry: ImageEntry, channels: int) -> tuple[str | None, bool]:
    """(reason it cannot be read or None, whether it is grayscale)."""
    try:
        with Image.open(entry.path) as image:
            image.verify()
        with Image.open(entry.path) as image:
            image.load()
            return None, channels == 3 and is_grayscale(image)
    except DECODE_ERRORS as error:
        return f"cannot decode the image ({type(error).__name__}: {error})", False


def verify(
    entries: Sequence[ImageEntry],
    *,
    channels: int = 3,
    convert_grayscale: bool = False,
    on_error: str = "raise",
    workers: int = 1,
) -> VerifyResult:
    """Open and fully decode every image up front (``workers`` threads; order is kept).

    Unreadable images, and grayscale images in an RGB benchmark without
    ``convert_grayscale``, raise :class:`DataError` (``on_error="raise"``) or
    are dropped as problems (``"skip"``). Grayscale images that will be
    converted are listed in ``grayscale``.
    """
    _check_on_error(on_error)
    kept: list[ImageEntry] = []
    problems: list[Problem] = []
    grayscale: list[str] = []

    def check(entry: ImageEntry) -> tuple[str | None, bool]:
        return _inspect(entry, channels)

    chunk = 64 * max(1, workers)  # bounded number of pending decodes; a raise stops soon
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            results = list(pool.map(check, part) if workers > 1 else map(check, part))
            for entry, (reason, gray) in zip(part, results):
                if reason is None and gray and not convert_grayscale:
                    reason = f"grayscale image in an RGB benchmark; {GRAYSCALE_FIX}"
                if reason is not None:
                    if on_error == "raise":
                        raise DataError(f"{entry.where}: {reason}")
                    problems.append(_problem_for(entry, reason))
                    continue
                kept.append(entry)
                if gray:
                    grayscale.append(entry.id)
    return VerifyResult(kept, problems, grayscale)


# --------------------------------------------------------------------------- the lazy set


class LazyImages:
    """``set.images`` for a lazy set: indexing / slicing decodes and stacks on demand.

    Lets code written for :class:`ImageSet` (``s.images[a:b]``) run unchanged,
    but decodes in the calling process: prefer a DataLoader with workers.
    """

    def __init__(self, dataset: FileImageSet):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        if self.dataset.resolution is None:
            raise AttributeError("shape unknown: the set's transform has no output_size (pass resolution=)")
        r = self.dataset.resolution
        return (len(self.dataset), self.dataset.channels, r, r)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.ndim == 0):
            return self.dataset.load(int(index))
        if isinstance(index, slice):
            indices = range(*index.indices(len(self.dataset)))
        else:
            indices = torch.as_tensor(index).reshape(-1).tolist()
        if len(indices) == 0:
            return torch.empty(0, *self.shape[1:])
        return torch.stack([self.dataset.load(i) for i in indices])


class FileImageSet(Dataset):
    """A lazily decoded set of image files with labels and stable ids.

    The interface of :class:`~diffguard_pl.data.benchmark.ImageSet`
    (``name``, ``split``, ``ids``, ``labels``, ``__len__``, ``__getitem__``,
    ``subset``; ``images`` is a :class:`LazyImages` view). ``problems`` and
    ``grayscale_converted`` record what was dropped / converted when the set was
    built (see :func:`data_report`).
    """

    def __init__(
        self,
        name: str,
        entries: Sequence[ImageEntry],
        transform: Transform,
        *,
        channels: int = 3,
        split: str = "test",
        resolution: int | None = None,
        convert_grayscale: bool = False,
        problems: Sequence[Problem] = (),
        grayscale_converted: Sequence[str] = (),
    ):
        if channels not in (1, 3):
            raise ValueError(f"set {name}: channels={channels}, use 1 or 3")
        self.name, self.split, self.channels = name, split, channels
        self.entries = list(entries)
        self.ids = [e.id for e in self.entries]
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"set {name}: sample ids are not unique")
        self.labels = torch.as_tensor([e.label for e in self.entries], dtype=torch.long)
        self.transform = transform
        self.resolution = resolution if resolution is not None else getattr(transform, "output_size", None)
        self.convert_grayscale = convert_grayscale
        self.problems = list(problems)
        self.grayscale_converted = list(grayscale_converted)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> torch.Tensor:
        """The preprocessed image [C, H, W] in [0, 1] of sample ``index``."""
        entry = self.entries[index]
        try:
            image = _decode(entry.path)
        except Exception as error:
            raise DataError(
                f"{entry.where}: cannot read the image ({type(error).__name__}: {error}); replace the file "
                "or remove it from the list, or set data.on_error=skip to verify every image and drop unreadable ones"
            ) from error
        tensor = self.transform(to_mode(image, self.channels, self.convert_grayscale, entry.where))
        r = self.resolution
        if tensor.ndim != 3 or tensor.shape[0] != self.channels or (r is not None and tensor.shape[1:] != (r, r)):
            raise DataError(
                f"set {self.name}: the transform gave shape {tuple(tensor.shape)} for {entry.path}, expected "
                f"({self.channels}, {r}, {r}); the transform's output size must equal the benchmark resolution"
            )
        return tensor

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {"image": self.load(index), "label": entry.label, "id": entry.id, "set": self.name, "split": self.split}

    @property
    def images(self) -> LazyImages:
        return LazyImages(self)

    def subset(self, indices: Iterable[int], split: str | None = None) -> FileImageSet:
        picked = [self.entries[i] for i in torch.as_tensor(list(indices), dtype=torch.long).tolist()]
        kept = {e.id for e in picked}
        return FileImageSet(
            self.name, picked, self.transform, channels=self.channels, split=split or self.split,
            resolution=self.resolution, convert_grayscale=self.convert_grayscale, problems=self.problems,
            grayscale_converted=[i for i in self.grayscale_converted if i in kept],
        )

    def report(self) -> dict:
        return {
            "images": len(self),
            "skipped": len(self.problems),
            "grayscale_converted": len(self.grayscale_converted),
            "problems": [p.to_dict() for p in self.problems],
        }


def _file_set(
    name: str,
    entries: list[ImageEntry],
    problems: list[Problem],
    transform: Transform,
    *,
    channels: int,
    split: str,
    resolution: int | None,
    convert_grayscale: bool,
    on_error: str,
    verify_files: bool | None,
    workers: int,
) -> FileImageSet:
    grayscale: list[str] = []
    if verify_files or (verify_files is None and on_error == "skip"):
        result = verify(entries, channels=channels, convert_grayscale=convert_grayscale, on_error=on_error,
                        workers=workers)
        entries, problems, grayscale = result.entries, problems + result.problems, result.grayscale
    return FileImageSet(name, entries, transform, channels=channels, split=split, resolution=resolution,
                        convert_grayscale=convert_grayscale, problems=problems, grayscale_converted=grayscale)


def folder_set(
    folder: PathLike,
    name: str,
    *,
    transform: Transform,
    channels: int = 3,
    split: str = "test",
    label: int = OOD_LABEL,
    resolution: int | None = None,
    convert_grayscale: bool = False,
    on_error: str = "raise",
    verify_files: bool | None = None,
    workers: int = 1,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> FileImageSet:
    """Every image under ``folder`` as one set (label -1: OOD, for scoring a folder without labels).

    Ids are ``"<name>/<path relative to folder>"``, so they do not collide
    with other sets' ids. Verification follows :func:`build_file_benchmark`.
    """
    _check_on_error(on_error)
    entries = read_image_folder(folder, label=label, extensions=extensions, id_prefix=f"{name}/")
    return _file_set(name, entries, [], transform, channels=channels, split=split, resolution=resolution,
                     convert_grayscale=convert_grayscale, on_error=on_error, verify_files=verify_files,
                     workers=workers)


# --------------------------------------------------------------------------- benchmark definitions

# OpenOOD v1.5 benchmarks as plain data: list files and data folders relative to an OpenOOD data root
# (the folder holding benchmark_imglist/, images_classic/ and images_largescale/).
# Source: Jingkang50/OpenOOD, openood/evaluation_api/datasets.py (DATA_INFO; last changed in commit 275260a,
# 2024-07-30), read at snapshot 3c35632; consistent with configs/datasets/{cifar10,imagenet}/*_ood.yml, which
# spell two set names differently (place365, openimageo) — DATA_INFO's names are used here.
# OpenOOD has one OOD validation list per benchmark, made of one set's images (val_tin.txt: TinyImageNet for
# CIFAR-10; val_openimage_o.txt: OpenImage-O for ImageNet). It is that set's "val" split here; every other OOD
# set has no validation images (an empty val split) — no val split is carved out of a test list.
# OpenOOD's test preprocessing ("preprocess"): resize the shorter side to pre_size, centre-crop img_size
# (openood/evaluation_api/preprocessor.py: cifar10 32/32, imagenet 256/224).
# Real data may need convert_grayscale=True (e.g. ImageNet holds some grayscale JPEGs; MNIST may be stored gray).


def _list(data_dir: str, name: str, benchmark: str) -> dict[str, str]:
    return {"list": f"benchmark_imglist/{benchmark}/{name}.txt", "data_dir": data_dir}


_CLASSIC, _LARGE = "images_classic", "images_largescale"

OPENOOD_BENCHMARKS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "num_classes": 10,
        "ind": {split: _list(_CLASSIC, f"{split}_cifar10", "cifar10") for split in ("train", "val", "test")},
        "ood": {
            "cifar100": {"group": "near", "val": None, "test": _list(_CLASSIC, "test_cifar100", "cifar10")},
            "tin": {
                "group": "near",
                "val": _list(_CLASSIC, "val_tin", "cifar10"),
                "test": _list(_CLASSIC, "test_tin", "cifar10"),
            },
            "mnist": {"group": "far", "val": None, "test": _list(_CLASSIC, "test_mnist", "cifar10")},
            "svhn": {"group": "far", "val": None, "test": _list(_CLASSIC, "test_svhn", "cifar10")},
            "texture": {"group": "far", "val": None, "test": _list(_CLASSIC, "test_texture", "cifar10")},
            "places365": {"group": "far", "val": None, "test": _list(_CLASSIC, "test_places365", "cifar10")},
        },
        "preprocess": {"kind": "resize_center_crop", "resize": 32, "size": 32},
    },
    "imagenet": {
        "num_classes": 1000,
        "ind": {split: _list(_LARGE, f"{split}_imagenet", "imagenet") for split in ("train", "val", "test")},
        "ood": {
            "ssb_hard": {"group": "near", "val": None, "test": _list(_LARGE, "test_ssb_hard", "imagenet")},
            "ninco": {"group": "near", "val": None, "test": _list(_LARGE, "test_ninco", "imagenet")},
            "inaturalist": {"group": "far", "val": None, "test": _list(_LARGE, "test_inaturalist", "imagenet")},
            # OpenOOD keeps the ImageNet benchmark's Textures images under images_classic/.
            "textures": {"group": "far", "val": None, "test": _list(_CLASSIC, "test_textures", "imagenet")},
            "openimage_o": {
                "group": "far",
                "val": _list(_LARGE, "val_openimage_o", "imagenet"),
                "test": _list(_LARGE, "test_openimage_o", "imagenet"),
            },
        },
        "preprocess": {"kind": "resize_center_crop", "resize": 256, "size": 224},
    },
}


def _definition(definition: str | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(definition, str):
        if definition not in OPENOOD_BENCHMARKS:
            raise DataError(f"unknown benchmark {definition!r}: known {', '.join(OPENOOD_BENCHMARKS)}")
        return definition, OPENOOD_BENCHMARKS[definition]
    name = str(definition.get("name", "files"))
    missing = [k for k in ("num_classes", "ind", "ood") if k not in definition]
    if missing:
        raise DataError(f"benchmark definition {name!r} lacks {', '.join(missing)}")
    splits = [s for s in ("train", "val", "test") if not isinstance(definition["ind"].get(s), Mapping)]
    if splits:
        raise DataError(f"benchmark definition {name!r}: ind needs train, val and test lists; missing {splits}")
    for set_name, spec in definition["ood"].items():
        if spec.get("group") not in ("near", "far") or not isinstance(spec.get("test"), Mapping):
            raise DataError(f"benchmark definition {name!r}: OOD set {set_name!r} needs group near|far and a test list")
    return name, definition


def default_transform(definition: str | Mapping[str, Any], resolution: int) -> StandardTransform:
    """The definition's preprocessing scaled to ``resolution`` (e.g. ImageNet 256/224 at 256: resize 293, crop 256)."""
    _, spec = _definition(definition)
    pre = spec.get("preprocess", {"kind": "resize", "size": resolution})
    if pre["kind"] == "resize":
        return standard_transform("resize", resolution)
    resize = pre.get("resize", pre["size"])
    return standard_transform(pre["kind"], resolution, resize=round(resolution * resize / pre["size"]))


def build_file_benchmark(
    definition: str | Mapping[str, Any],
    data_root: PathLike,
    resolution: int,
    channels: int = 3,
    transform: Transform | None = None,
    on_error: str = "raise",
    *,
    convert_grayscale: bool = False,
    verify_files: bool | None = None,
    workers: int = 1,
    check_files: bool = True,
    name: str | None = None,
) -> Benchmark:
    """A :class:`Benchmark` of lazy :class:`FileImageSet` s from an image-list definition.

    ``definition`` is a key of :data:`OPENOOD_BENCHMARKS` or a dict of the same
    shape. ``transform`` must give ``resolution`` x ``resolution`` images
    (default: :func:`default_transform`). InD labels must lie in
    [0, num_classes); OOD images get label -1 whatever their list says. An OOD
    set without a ``val`` list has an empty val split.

    ``on_error="skip"`` drops bad lines and images (verifying every image
    first; ``verify_files`` forces verification on or off, ``workers`` threads
    decode in parallel) and records them per set (:func:`data_report`).
    A list left empty, or an id shared by two evaluated sets (InD val / test,
    OOD val / test: results are keyed by id), is a :class:`DataError`.
    """
    _check_on_error(on_error)
    bench_name, spec = _definition(definition)
    num_classes = int(spec["num_classes"])
    transform = transform if transform is not None else default_transform(spec, resolution)
    size = getattr(transform, "output_size", resolution)
    if size != resolution:
        raise ValueError(f"the transform gives {size}x{size} images but the benchmark resolution is {resolution}")
    root = Path(data_root)

    def load(set_name: str, split: str, list_spec: Mapping[str, str] | None, ood: bool) -> FileImageSet:
        entries: list[ImageEntry] = []
        problems: list[Problem] = []
        if list_spec is not None and "folder" in list_spec:  # a plain folder (class sub-folders for InD)
            entries = read_image_folder(root / list_spec["folder"], class_folders=not ood,
                                        id_prefix=f"{list_spec['folder'].rstrip('/')}/")
        elif list_spec is not None:
            entries, problems = read_image_list(root / list_spec["list"], root / list_spec.get("data_dir", ""),
                                                on_error=on_error, check_files=check_files)
        if list_spec is not None:
            checked = []
            for e in entries:
                if ood:
                    checked.append(e if e.label == OOD_LABEL else replace(e, label=OOD_LABEL))
                elif not 0 <= e.label < num_classes:
                    reason = (f"label {e.label} is not an InD class of {bench_name} (0..{num_classes - 1}); "
                              "fix the list, or list OOD images in an OOD set")
                    if on_error == "raise":
                        raise DataError(f"{e.where}: {reason}")
                    problems.append(_problem_for(e, reason))
                else:
                    checked.append(e)
            entries = checked
        result = _file_set(set_name, entries, problems, transform, channels=channels, split=split,
                           resolution=resolution, convert_grayscale=convert_grayscale, on_error=on_error,
                           verify_files=verify_files, workers=workers)
        if list_spec is not None and len(result) == 0:
            raise DataError(f"{root / list_spec.get('list', list_spec.get('folder', ''))}: no usable images left in set {set_name!r} ({split}); "
                            f"{len(result.problems)} problem(s), first: {result.problems[0] if result.problems else '-'}")
        return result

    ind = {split: load(IND, split, spec["ind"][split], False) for split in ("train", "val", "test")}
    benchmark = Benchmark(name=name or bench_name, num_classes=num_classes, channels=channels, resolution=resolution,
                          train=ind["train"], val=ind["val"], test=ind["test"])
    for set_name, set_spec in spec["ood"].items():
        benchmark.ood[set_name] = OODSet(
            set_spec["group"],
            load(set_name, "val", set_spec.get("val"), True),
            load(set_name, "test", set_spec["test"], True),
        )
    _check_unique_ids(benchmark)
    return benchmark


def _check_unique_ids(benchmark: Benchmark) -> None:
    owner: dict[str, str] = {}
    clashes: list[str] = []
    for split, set_name, s in benchmark.all_sets():
        if split == "train":
            continue
        for sample_id in s.ids:
            where = f"{set_name}/{split}"
            if sample_id in owner:
                clashes.append(f"{sample_id!r} in {owner[sample_id]} and {where}")
            else:
                owner[sample_id] = where
    if clashes:
        shown = "; ".join(clashes[:3]) + (f"; ... ({len(clashes)} in all)" if len(clashes) > 3 else "")
        raise DataError(f"benchmark {benchmark.name}: sample ids shared between evaluated sets ({shown}); "
                        "results are keyed by id, so each image may appear in only one of InD val / test and the OOD "
                        "val / test lists: fix the lists")


def data_report(benchmark: Benchmark) -> dict:
    """Skipped lines / images and grayscale conversions per set, JSON-ready (for results.json)."""
    sets = {f"{name}/{split}": s.report() for split, name, s in benchmark.all_sets() if isinstance(s, FileImageSet)}
    return {
        "skipped": sum(r["skipped"] for r in sets.values()),
        "grayscale_converted": sum(r["grayscale_converted"] for r in sets.values()),
        "sets": sets,
    }


__all__ = [
    "IMAGE_EXTENSIONS",
    "OPENOOD_BENCHMARKS",
    "DataError",
    "FileImageSet",
    "ImageEntry",
    "LazyImages",
    "Problem",
    "ResizeCenterCrop",
    "SquareResize",
    "VerifyResult",
    "build_file_benchmark",
    "data_report",
    "default_transform",
    "folder_classes",
    "folder_set",
    "is_grayscale",
    "read_image_folder",
    "read_image_list",
    "standard_transform",
    "to_mode",
    "to_tensor",
    "verify",
]
