"""A benchmark definition (``data.benchmark=lists``, ``data.definition``): the shapes it may take, checked, its
InD class names, and the splits carved from a set by image id. docs/own_data.md walks through one.

A definition, its paths relative to ``data.root``::

    name: my_data                  # optional: the benchmark's name in the outputs
    ind:                           # the in-distribution classes, in one of three shapes:
      folder: images               #   one set, carved into train / val / test (data.val_fraction, test_fraction)
      # train: {folder: train}     #   or train and test given, val carved from train (val null or absent)
      # val: {folder: val}         #   or all three given
      # test: {folder: test}
    ood:                           # every OOD set, near or far, in one of two shapes:
      cats: {group: near, folder: cats}                     # one set, carved into val / test (ood_val_fraction)
      noise: {group: far, val: null, test: {folder: noise}}  # or the splits given (val null: no validation images)
    num_classes: 3                 # optional when the InD images are in class folders (checked when given)
    class_names: [cat, dog, fox]   # optional; class folders: their names

A set is a ``{folder: DIR}`` (every image under DIR; for InD one sub-folder per class, the classes sorted by
name, a class's position its label) or a ``{list: FILE, data_dir: DIR}`` (OpenOOD-style ``path label`` lines,
see :mod:`diffguard_pl.data.image_lists`). The class names are the sub-folder names of the InD training folder
(or of the one InD folder); a val / test folder may lack a class, never add one.

Carved splits. An image's split follows from its id (its path as the definition names it) and ``data.seed``
alone: a hash of the two, compared with the fractions. So adding, removing or skipping images never moves
another image between train, val and test (a model trained earlier is never tested on its training images),
and the split does not depend on the order files are listed in. The fractions hold on average, not exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffguard_pl.data.benchmark import IND
from diffguard_pl.data.image_lists import OPENOOD_BENCHMARKS, folder_classes
from diffguard_pl.errors import DataError
from diffguard_pl.seeding import sample_seed

SOURCE_KEYS = ("folder", "list")
WHERE = "data.definition"  # how errors name the definition


@dataclass(frozen=True)
class CarveOptions:
    """The fractions and seed of the splits carved from a set (the ``data.*`` keys of the same names)."""

    val_fraction: float = 0.15  # InD images for validation (of the one InD set, or of its train set)
    test_fraction: float = 0.25  # InD images for testing (of the one InD set)
    ood_val_fraction: float = 0.2  # of an OOD set given as one set
    seed: int = 0


def is_source(spec: Any) -> bool:
    """Whether ``spec`` names images itself (a folder or a list) rather than splits."""
    return isinstance(spec, Mapping) and any(key in spec for key in SOURCE_KEYS)


def _check_source(spec: Any, where: str) -> None:
    if not isinstance(spec, Mapping) or sum(key in spec for key in SOURCE_KEYS) != 1:
        raise DataError(f"{where} must be {{folder: DIR}} or {{list: FILE, data_dir: DIR}} (one of them); "
                        f"got {spec!r}")
    allowed = {"folder"} if "folder" in spec else {"list", "data_dir"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise DataError(f"{where} has {', '.join(extra)}, which a {'folder' if 'folder' in spec else 'list'} set "
                        f"does not take (keys: {', '.join(sorted(allowed))})")


def _check_splits(spec: Mapping, where: str, required: Sequence[str], optional: Sequence[str]) -> None:
    """A mapping of splits: each required split a source, each optional one a source or null / absent."""
    for split in required:
        if spec.get(split) is None:
            raise DataError(f"{where}.{split} is missing: give {{folder: DIR}} or {{list: FILE, data_dir: DIR}}, "
                            f"or give {where} as one set ({where}: {{folder: DIR}}) to have it split for you")
        _check_source(spec[split], f"{where}.{split}")
    for split in optional:
        if spec.get(split) is not None:
            _check_source(spec[split], f"{where}.{split}")


def benchmark_definition(definition: str | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(name, definition) of a key of :data:`OPENOOD_BENCHMARKS` or a definition of the module docstring's
    shape, checked (DataError naming the key at fault and the shapes it may take). Nothing is read."""
    if isinstance(definition, str):
        if definition not in OPENOOD_BENCHMARKS:
            raise DataError(f"unknown benchmark {definition!r}: known {', '.join(OPENOOD_BENCHMARKS)}")
        return definition, OPENOOD_BENCHMARKS[definition]
    name = str(definition.get("name", "files"))
    unknown = sorted(set(definition) - {"name", "num_classes", "class_names", "ind", "ood", "preprocess"})
    if unknown:
        raise DataError(f"{WHERE} has {', '.join(unknown)}: its keys are name, ind, ood, num_classes, class_names "
                        "(docs/own_data.md)")
    ind = definition.get("ind")
    if not isinstance(ind, Mapping):
        raise DataError(f"{WHERE}.ind is missing: the InD images, e.g. ind: {{folder: my_images}} (one sub-folder "
                        "per class) or ind: {train: {folder: train}, test: {folder: test}}")
    if is_source(ind):
        _check_source(ind, f"{WHERE}.ind")
    else:
        _check_splits(ind, f"{WHERE}.ind", ("train", "test"), ("val",))
    if "num_classes" not in definition and not ind_class_folder(definition):
        raise DataError(f"{WHERE}.num_classes is missing: image lists give labels, not classes; set it (and "
                        "class_names if you like), or give the InD images as class folders")
    names = definition.get("class_names")
    if names is not None and (not isinstance(names, Sequence) or isinstance(names, str)):
        raise DataError(f"{WHERE}.class_names must be a list of names, one per InD class; got {names!r}")
    ood = definition.get("ood") or {}
    if not isinstance(ood, Mapping):
        raise DataError(f"{WHERE}.ood must map each OOD set's name to {{group: near|far, folder: DIR}}; got {ood!r}")
    for set_name, spec in ood.items():
        where = f"{WHERE}.ood.{set_name}"
        if not isinstance(spec, Mapping) or spec.get("group") not in ("near", "far"):
            raise DataError(f"{where} needs group: near or far (near: similar to the InD classes; far: unlike them)")
        if is_source(spec):
            _check_source({k: v for k, v in spec.items() if k != "group"}, where)
        else:
            _check_splits(spec, where, ("test",), ("val",))
    return name, definition


def ind_class_folder(definition: Mapping[str, Any]) -> dict | None:
    """The InD set whose sub-folders are the classes (the one set, or the train set), if it is a folder."""
    ind = definition["ind"]
    first = ind if is_source(ind) else ind.get("train")
    return first if isinstance(first, Mapping) and "folder" in first else None


def class_names(definition: Mapping[str, Any], root: str | Path) -> list[str] | None:
    """The InD class names: the sub-folders of the InD (training) folder, else ``class_names``; None when the
    definition has neither. Checked against ``num_classes`` and ``class_names`` when those are given."""
    folders = ind_class_folder(definition)
    given = definition.get("class_names")
    given = [str(n) for n in given] if given is not None else None
    if folders is None:
        if given is not None and len(given) != int(definition["num_classes"]):
            raise DataError(f"{WHERE}.class_names has {len(given)} names but num_classes is "
                            f"{definition['num_classes']}: give one name per class")
        return given
    folder = Path(root) / folders["folder"]
    names = folder_classes(folder)
    if not names:
        raise DataError(f"{folder} has no sub-folders: put the InD images in one sub-folder per class "
                        f"({folder}/<class>/<image>), the sub-folder's name being the class name")
    if "num_classes" in definition and int(definition["num_classes"]) != len(names):
        raise DataError(f"{WHERE}.num_classes is {definition['num_classes']} but {folder} has {len(names)} class "
                        f"sub-folders ({', '.join(names)}): fix num_classes, or drop it (the sub-folders count)")
    if given is not None and given != names:
        raise DataError(f"{WHERE}.class_names {given} differ from the class sub-folders of {folder} {names} (the "
                        "labels follow the sorted sub-folder names): drop class_names, or rename the sub-folders")
    return names


def num_classes(definition: Mapping[str, Any], root: str | Path) -> int:
    """The number of InD classes: ``num_classes``, else the count of class sub-folders (checked alike)."""
    _, definition = benchmark_definition(definition)
    names = class_names(definition, root)
    return int(definition["num_classes"]) if "num_classes" in definition else len(names)


def carve(ids: Sequence[str], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Indices of ``ids`` in ``len(fractions) + 1`` parts: an id falls in part k when the hash of (id, seed),
    a number in [0, 1), lies in the k-th interval of the cumulative fractions; the last part takes the rest.
    Each part keeps the ids' order."""
    bounds, total = [], 0.0
    for fraction in fractions:
        total += fraction
        bounds.append(total)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for index, sample_id in enumerate(ids):
        share = sample_seed(f"split:{sample_id}", seed) / float(1 << 63)
        parts[next((k for k, bound in enumerate(bounds) if share < bound), len(bounds))].append(index)
    return parts


def ind_splits(spec: Mapping[str, Any], load: Callable[[str, str, Any, bool], Any],
               carving: CarveOptions) -> dict[str, Any]:
    """The InD train / val / test sets of ``definition["ind"]``: read as given (``load(set name, split, source,
    ood)`` reads one source), or carved by image id from the one set, or val from the train set."""
    if is_source(spec):
        val, test, train = carve_set(load(IND, "train", spec, False),
                                     {"val": carving.val_fraction, "test": carving.test_fraction}, "train",
                                     carving.seed)
    else:
        train, test = load(IND, "train", spec["train"], False), load(IND, "test", spec["test"], False)
        if spec.get("val") is None:
            val, train = carve_set(train, {"val": carving.val_fraction}, "train", carving.seed)
        else:
            val = load(IND, "val", spec["val"], False)
    return {"train": train, "val": val, "test": test}


def carve_set(pool: Any, fractions: Mapping[str, float], rest: str, seed: int) -> list[Any]:
    """A set (``ids``, ``subset``; ``problems`` if it records skipped files) cut by :func:`carve` into the
    splits ``fractions`` names and ``rest``, in that order; its skipped files stay with ``rest``. An empty part
    is a DataError, but for an OOD set's val split."""
    parts = []
    for split, indices in zip([*fractions, rest], carve(pool.ids, list(fractions.values()), seed)):
        if not indices and (pool.name == IND or split != "val"):
            raise DataError(f"set {pool.name!r}: its {len(pool)} images leave its {split} split empty when carved "
                            f"by id ({', '.join(f'{s} {f:g}' for s, f in fractions.items())}): add images, or give "
                            f"its {split} split in {WHERE}")
        parts.append(pool.subset(indices, split))
        if hasattr(pool, "problems"):
            parts[-1].problems = list(pool.problems) if split == rest else []
    return parts


def check_training_classes(labels: Sequence[int], num_classes: int, names: Sequence[str] | None) -> None:
    """DataError when an InD class has no training image (a classifier could never predict it)."""
    missing = sorted(set(range(num_classes)) - set(labels))
    if missing:
        shown = ", ".join(names[k] if names else str(k) for k in missing)
        raise DataError(f"InD classes without training images: {shown}; add training images of them (in their "
                        "class folder, or list lines with their labels), or remove those classes")


__all__ = [
    "CarveOptions", "benchmark_definition", "carve", "carve_set", "check_training_classes", "class_names",
    "ind_class_folder", "ind_splits", "is_source", "num_classes",
]
