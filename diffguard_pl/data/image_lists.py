"""Image lists and folders: which image files a set holds, with labels and ids (nothing is decoded here).

Image lists (OpenOOD v1.5, ``benchmark_imglist/<benchmark>/<split>_<set>.txt``)
hold one ``relative/path label`` per line, the label a class index or -1 for
OOD, the path relative to a data folder (``images_classic/`` or
``images_largescale/`` under the data root). Blank lines and lines starting
with ``#`` are ignored. The line is split at its *last* whitespace, so a path
may contain spaces (OpenOOD itself splits at the first space; for its own lists,
whose paths have none, the two agree). An entry's id is the image's path
relative to its data folder (as written in the list), so per-sample seeding
(:func:`~diffguard_pl.data.benchmark.sample_seed`) does not depend on where the
data lives.

Errors. Anything wrong with a list line (no label, a non-integer label, a label
below -1, a missing file, a duplicate) raises a :class:`DataError` that names
the list file, the line and what to fix. With ``on_error="skip"`` such lines
are dropped and returned as :class:`Problem` records (for results.json, see
:func:`diffguard_pl.data.file_benchmark.data_report`).

Also here: the OpenOOD v1.5 benchmark registry :data:`OPENOOD_BENCHMARKS` (list
files and data folders per set); :mod:`diffguard_pl.data.definition` checks a
definition of the same shape (or of the shapes your own data may take).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffguard_pl.data.benchmark import OOD_LABEL
from diffguard_pl.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ON_ERROR = ("raise", "skip")

PathLike = str | os.PathLike


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


def check_on_error(on_error: str) -> None:
    """ValueError unless ``on_error`` is one of :data:`ON_ERROR`."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")


def problem_for(entry: ImageEntry, reason: str) -> Problem:
    """The :class:`Problem` record of a dropped entry: its list line, or the image file for folder entries."""
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
    check_on_error(on_error)
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
    classes: Sequence[str] | None = None,
    id_prefix: str = "",
) -> list[ImageEntry]:
    """Every image under ``folder`` (recursive, sorted by relative path; hidden files skipped).

    Ids are ``id_prefix`` + the path relative to ``folder``. With
    ``class_folders=True`` each image's label is the position of its
    top-level sub-folder in ``classes`` (None: :func:`folder_classes` of
    ``folder``; ``label`` is ignored); images directly in ``folder``, and
    sub-folders not in ``classes``, are errors.
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
    known = list(folder_classes(folder) if classes is None else classes) if class_folders else []
    classes_at = {name: k for k, name in enumerate(known)}
    if class_folders and classes is not None:
        strange = sorted(set(folder_classes(folder)) - set(known))
        if strange:
            raise DataError(f"{folder} has class sub-folders {', '.join(strange)} that the training folder lacks "
                            f"(its classes: {', '.join(known)}): a class must have training images; rename or "
                            "remove them")
    entries = []
    for rel in found:
        if class_folders:
            top = rel.split("/", 1)[0]
            if "/" not in rel or top not in classes_at:
                raise DataError(f"{folder / rel} is not inside a class sub-folder of {folder}: put each InD "
                                f"image in the sub-folder of its class ({folder}/<class>/<image>)")
            item_label = classes_at[top]
        else:
            item_label = label
        entries.append(ImageEntry(str(folder / rel), id_prefix + rel, item_label))
    return entries


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


__all__ = [
    "IMAGE_EXTENSIONS",
    "ON_ERROR",
    "OPENOOD_BENCHMARKS",
    "ImageEntry",
    "PathLike",
    "Problem",
    "check_on_error",
    "folder_classes",
    "problem_for",
    "read_image_folder",
    "read_image_list",
]
