"""Benchmarks from image files: lazy sets of OpenOOD v1.5 image lists and plain folders.

Everything here is lazy: a :class:`FileImageSet` holds paths, labels and ids
and decodes one image (with PIL) per ``__getitem__``, so a 50k-image test set
or ImageNet's 1.28M-image train list costs only the list in memory. A sample is
the same dict as :class:`~diffguard_pl.data.benchmark.ImageSet`'s:
``{"image": float [C, H, W] in [0, 1], "label", "id", "set", "split"}``; the id
is the image's path relative to its data folder (see
:mod:`diffguard_pl.data.image_lists`, which reads the lists and folders;
:mod:`diffguard_pl.data.image_files` decodes and preprocesses the images).

How files become samples, and what happens to bad ones, is one
:class:`ReadOptions` (transform, channels, resolution, grayscale conversion;
``on_error``, ``verify_files``, ``workers``), passed to every function here.

Errors. A bad list line or image raises a :class:`DataError` that names the
list file, the line and what to fix. With ``on_error="skip"`` such lines and
images are dropped and recorded per set (:func:`data_report`). A lazy set
cannot drop a sample when it is fetched without silently changing the set, so
skip mode first runs :func:`~diffguard_pl.data.image_files.verify` over every
image and builds the set from what is left. In raise mode files are decoded
only when used (``verify_files=True`` checks them all up front instead), and a
bad one raises when it is reached.

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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffguard_pl.data.benchmark import IND, OOD_LABEL, Benchmark, OODSet
from diffguard_pl.data.image_files import Transform, decode, default_transform, to_mode, verify
from diffguard_pl.data.definition import (
    CarveOptions, benchmark_definition, carve_set, check_training_classes, class_names, ind_class_folder, ind_splits,
    is_source,
)
from diffguard_pl.data.image_lists import (
    IMAGE_EXTENSIONS, ImageEntry, PathLike, Problem, check_on_error, problem_for, read_image_folder, read_image_list,
)
from diffguard_pl.errors import DataError


# --------------------------------------------------------------------------- how files become samples


@dataclass(frozen=True)
class ReadOptions:
    """How image files become samples, and what is done with bad ones.

    Decoding (what a sample's tensor depends on): ``transform`` (a PIL image to [C, H, W] in [0, 1]; None in
    :func:`build_file_benchmark`: the benchmark's standard preprocessing), ``channels`` (1 or 3), ``resolution``
    (None: the transform's ``output_size``; :func:`build_file_benchmark` needs it) and ``convert_grayscale``
    (replicate grayscale images into RGB rather than fail). Bad files, when a set is built: ``on_error``
    ("raise", or "skip": drop bad lines and images, verifying every image first), ``verify_files`` (force that
    verification on or off; None: only with "skip") and ``workers`` (threads that decode in parallel).
    """

    transform: Transform | None = None
    channels: int = 3
    resolution: int | None = None
    convert_grayscale: bool = False
    on_error: str = "raise"
    verify_files: bool | None = None
    workers: int = 1

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels}, use 1 or 3")
        check_on_error(self.on_error)

    def decoding(self) -> tuple:
        """What the decoded images depend on (not how bad files are handled)."""
        return self.transform, self.channels, self.resolution, self.convert_grayscale


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
        options = self.dataset.options
        if options.resolution is None:
            raise AttributeError("shape unknown: the set's transform has no output_size (set ReadOptions.resolution)")
        r = options.resolution
        return (len(self.dataset), options.channels, r, r)

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
    ``subset``; ``images`` is a :class:`LazyImages` view). ``options`` say how
    its files are decoded (``options.transform`` is needed). ``problems`` and
    ``grayscale_converted`` record what was dropped / converted when the set was
    built (see :func:`data_report`).
    """

    def __init__(
        self,
        name: str,
        entries: Sequence[ImageEntry],
        options: ReadOptions,
        *,
        split: str = "test",
        problems: Sequence[Problem] = (),
        grayscale_converted: Sequence[str] = (),
    ):
        if options.transform is None:
            raise ValueError(f"set {name}: ReadOptions.transform is None; pass the transform that decodes its images")
        if options.resolution is None:
            options = replace(options, resolution=getattr(options.transform, "output_size", None))
        self.name, self.split, self.options = name, split, options
        self.entries = list(entries)
        self.ids = [e.id for e in self.entries]
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"set {name}: sample ids are not unique")
        self.labels = torch.as_tensor([e.label for e in self.entries], dtype=torch.long)
        self.problems = list(problems)
        self.grayscale_converted = list(grayscale_converted)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> torch.Tensor:
        """The preprocessed image [C, H, W] in [0, 1] of sample ``index``."""
        entry = self.entries[index]
        try:
            image = decode(entry.path)
        except Exception as error:
            raise DataError(
                f"{entry.where}: cannot read the image ({type(error).__name__}: {error}); replace the file "
                "or remove it from the list, or set data.on_error=skip to verify every image and drop unreadable ones"
            ) from error
        options = self.options
        tensor = options.transform(to_mode(image, options.channels, options.convert_grayscale, entry.where))
        c, r = options.channels, options.resolution
        if tensor.ndim != 3 or tensor.shape[0] != c or (r is not None and tensor.shape[1:] != (r, r)):
            raise DataError(
                f"set {self.name}: the transform gave shape {tuple(tensor.shape)} for {entry.path}, expected "
                f"({c}, {r}, {r}); the transform's output size must equal the benchmark resolution"
            )
        return tensor

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {"image": self.load(index), "label": entry.label, "id": entry.id, "set": self.name, "split": self.split}

    @property
    def images(self) -> LazyImages:
        return LazyImages(self)

    @classmethod
    def pooled(cls, name: str, sets: Sequence[FileImageSet], split: str) -> FileImageSet:
        """The sets as one (their entries in order); they must decode images alike (:meth:`ReadOptions.decoding`)."""
        first = sets[0]
        for other in sets[1:]:
            if other.options.decoding() != first.options.decoding():
                raise ValueError(f"cannot pool sets {first.name} and {other.name}: they decode images differently")
        return cls(name, [e for s in sets for e in s.entries], first.options, split=split,
                   problems=[p for s in sets for p in s.problems],
                   grayscale_converted=[i for s in sets for i in s.grayscale_converted])

    def content_key(self) -> str:
        """What the decoded images depend on, without decoding them: each file's path, size and modification
        time, the labels and ids, and how files become tensors (the transform, channels, resolution)."""
        transform, *rest = self.options.decoding()
        parts = [repr(transform), *map(str, rest)]
        for entry in self.entries:
            stat = os.stat(entry.path)
            parts.append(f"{entry.id}\t{entry.label}\t{os.path.abspath(entry.path)}\t{stat.st_size}\t{stat.st_mtime_ns}")
        return "\n".join(parts)

    def subset(self, indices: Iterable[int], split: str | None = None) -> FileImageSet:
        picked = [self.entries[i] for i in torch.as_tensor(list(indices), dtype=torch.long).tolist()]
        kept = {e.id for e in picked}
        return FileImageSet(
            self.name, picked, self.options, split=split or self.split, problems=self.problems,
            grayscale_converted=[i for i in self.grayscale_converted if i in kept],
        )

    def report(self) -> dict:
        return {
            "images": len(self),
            "skipped": len(self.problems),
            "grayscale_converted": len(self.grayscale_converted),
            "problems": [p.to_dict() for p in self.problems],
        }


def _file_set(name: str, entries: list[ImageEntry], problems: list[Problem], split: str,
              options: ReadOptions) -> FileImageSet:
    grayscale: list[str] = []
    if options.verify_files or (options.verify_files is None and options.on_error == "skip"):
        result = verify(entries, channels=options.channels, convert_grayscale=options.convert_grayscale,
                        on_error=options.on_error, workers=options.workers)
        entries, problems, grayscale = result.entries, problems + result.problems, result.grayscale
    return FileImageSet(name, entries, options, split=split, problems=problems, grayscale_converted=grayscale)


def folder_set(
    folder: PathLike,
    name: str,
    options: ReadOptions,
    *,
    split: str = "test",
    label: int = OOD_LABEL,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> FileImageSet:
    """Every image under ``folder`` as one set (label -1: OOD, for scoring a folder without labels).

    Ids are ``"<name>/<path relative to folder>"``, so they do not collide
    with other sets' ids. ``options.transform`` is needed; verification
    follows :func:`build_file_benchmark`.
    """
    entries = read_image_folder(folder, label=label, extensions=extensions, id_prefix=f"{name}/")
    return _file_set(name, entries, [], split, options)


def build_file_benchmark(
    definition: str | Mapping[str, Any],
    data_root: PathLike,
    options: ReadOptions,
    *,
    check_files: bool = True,
    name: str | None = None,
    carving: CarveOptions = CarveOptions(),
) -> Benchmark:
    """A :class:`Benchmark` of lazy :class:`FileImageSet` s from an image-list definition.

    ``definition`` is a key of :data:`OPENOOD_BENCHMARKS` or a dict of a shape
    :mod:`diffguard_pl.data.definition` describes (folders or lists, the
    splits given or carved by image id with ``carving``). ``options.resolution`` is the benchmark's;
    ``options.transform`` must give ``resolution`` x ``resolution`` images (None:
    :func:`default_transform`). InD labels must lie in [0, num_classes); OOD
    images get label -1 whatever their list says. An OOD set whose ``val`` is
    null has an empty val split. The InD class names (class sub-folders, or
    ``class_names``) become ``Benchmark.class_names``.

    ``options.on_error="skip"`` drops bad lines and images (verifying every
    image first; ``options.verify_files`` forces verification on or off,
    ``options.workers`` threads decode in parallel) and records them per set
    (:func:`data_report`). A list left empty, a split carved empty, an InD class
    without training images, or an id shared by two evaluated
    sets (InD val / test, OOD val / test: results are keyed by id), is a
    :class:`DataError`.
    """
    resolution, on_error = options.resolution, options.on_error
    if resolution is None:
        raise ValueError("build_file_benchmark needs ReadOptions.resolution: the benchmark's image size")
    bench_name, spec = benchmark_definition(definition)
    root = Path(data_root)
    names = class_names(spec, root) if not isinstance(definition, str) else None
    num_classes = int(spec["num_classes"]) if "num_classes" in spec else len(names)
    if options.transform is None:
        options = replace(options, transform=default_transform(spec, resolution))
    size = getattr(options.transform, "output_size", resolution)
    if size != resolution:
        raise ValueError(f"the transform gives {size}x{size} images but the benchmark resolution is {resolution}")

    def load(set_name: str, split: str, list_spec: Mapping[str, str] | None, ood: bool) -> FileImageSet:
        entries: list[ImageEntry] = []
        problems: list[Problem] = []
        if list_spec is not None and "folder" in list_spec:  # a plain folder (class sub-folders for InD)
            entries = read_image_folder(root / list_spec["folder"], class_folders=not ood,
                                        classes=names if not ood and names is not None else None,
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
                    problems.append(problem_for(e, reason))
                else:
                    checked.append(e)
            entries = checked
        result = _file_set(set_name, entries, problems, split, options)
        if list_spec is not None and len(result) == 0:
            raise DataError(f"{root / list_spec.get('list', list_spec.get('folder', ''))}: no usable images left in set {set_name!r} ({split}); "
                            f"{len(result.problems)} problem(s), first: {result.problems[0] if result.problems else '-'}")
        return result

    ind = ind_splits(spec["ind"], load, carving)
    if ind_class_folder(spec) is not None:  # an empty class folder, or one whose images were all carved away
        check_training_classes(ind["train"].labels.tolist(), num_classes, names)
    benchmark = Benchmark(name=name or bench_name, num_classes=num_classes, channels=options.channels,
                          resolution=resolution, train=ind["train"], val=ind["val"], test=ind["test"],
                          class_names=names)
    for set_name, set_spec in (spec.get("ood") or {}).items():
        if is_source(set_spec):  # one set: carved into val / test
            pool = load(set_name, "test", {k: v for k, v in set_spec.items() if k != "group"}, True)
            val, test = carve_set(pool, {"val": carving.ood_val_fraction}, "test", carving.seed)
        else:
            val, test = load(set_name, "val", set_spec.get("val"), True), load(set_name, "test", set_spec["test"], True)
        benchmark.ood[set_name] = OODSet(set_spec["group"], val, test)
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
    "FileImageSet",
    "LazyImages",
    "ReadOptions",
    "build_file_benchmark",
    "data_report",
    "folder_set",
]
