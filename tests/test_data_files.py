"""Image-file data sources: OpenOOD-style lists, folders, lazy sets, preprocessing, benchmarks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from diffguard_pl.config import DataConfig
from diffguard_pl.data import IND, OOD_LABEL, sample_seed
from diffguard_pl.data.datamodule import BenchmarkDataModule
from diffguard_pl.data.file_benchmark import FileImageSet, ReadOptions, build_file_benchmark, data_report, folder_set
from diffguard_pl.data.image_files import ResizeCenterCrop, is_grayscale, standard_transform, to_mode, verify
from diffguard_pl.data.image_lists import OPENOOD_BENCHMARKS, read_image_folder, read_image_list
from diffguard_pl.errors import DataError

RNG = np.random.default_rng(0)


def write_image(path: Path, size=(32, 32), mode="RGB") -> str:
    """A random image of ``size`` (width, height); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "L":
        Image.fromarray(RNG.integers(0, 256, (h, w), dtype=np.uint8), "L").save(path)
    else:
        Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode).save(path)
    return str(path)


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(RNG.integers(0, 256, 300, dtype=np.uint8).tobytes())


def write_list(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def small_tree(tmp_path):
    """A data folder with RGB PNG / JPEG images, a grayscale one, a corrupt one and a path with a space."""
    root = tmp_path / "images"
    write_image(root / "a/one.png")
    write_image(root / "a/two.jpg", (40, 30))
    write_image(root / "b/with space.png")
    write_image(root / "b/gray.png", mode="L")
    write_corrupt(root / "b/corrupt.png")
    return root


# --------------------------------------------------------------------------- lists


def test_list_parses_comments_spaces_and_ids(small_tree, tmp_path):
    lst = write_list(tmp_path / "list.txt", ["# header", "", "a/one.png 0", "  a/two.jpg 3  ", "b/with space.png -1"])
    entries, problems = read_image_list(lst, small_tree)
    assert problems == []
    assert [e.id for e in entries] == ["a/one.png", "a/two.jpg", "b/with space.png"]
    assert [e.label for e in entries] == [0, 3, OOD_LABEL]
    assert [e.line for e in entries] == [3, 4, 5]
    assert entries[2].path == str(small_tree / "b/with space.png")
    # Ids do not depend on where the data lives, so per-sample seeds do not either.
    assert sample_seed(entries[0].id) == sample_seed("a/one.png")


@pytest.mark.parametrize(
    "line, words",
    [
        ("a/one.png", ["no label"]),
        ("a/one.png cat", ["not an integer"]),
        ("a/one.png 1.5", ["not an integer"]),
        ("a/one.png -2", ["< -1"]),
        ("a/missing.png 0", ["does not exist", "a/missing.png"]),
        ("a/one.png 1", ["duplicate of line 1"]),
    ],
)
def test_bad_line_raises_naming_file_and_line(small_tree, tmp_path, line, words):
    lst = write_list(tmp_path / "bad.txt", ["a/one.png 0", "# comment", line])
    with pytest.raises(DataError) as info:
        read_image_list(lst, small_tree)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{lst}:3:" in message and repr(line) in message
    for word in words:
        assert word in message


def test_missing_list_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image_list(tmp_path / "nope.txt", tmp_path)


def test_skip_mode_counts_bad_lines_and_corrupt_files(small_tree, tmp_path):
    lst = write_list(
        tmp_path / "list.txt",
        ["a/one.png 0", "a/two.jpg", "b/corrupt.png 1", "a/gone.png 1", "b/with space.png 2"],
    )
    entries, problems = read_image_list(lst, small_tree, on_error="skip")
    assert [p.line for p in problems] == [2, 4] and all(p.file == str(lst) for p in problems)
    assert [e.id for e in entries] == ["a/one.png", "b/corrupt.png", "b/with space.png"]

    # The corrupt file passes the list check; verification (a real decode) drops it.
    result = verify(entries, on_error="skip")
    assert [e.id for e in result.entries] == ["a/one.png", "b/with space.png"]
    assert len(result.problems) == 1 and result.problems[0].line == 3
    assert "corrupt.png" in result.problems[0].reason and "cannot decode" in result.problems[0].reason
    with pytest.raises(DataError, match=rf"{lst}:3: .*corrupt\.png"):
        verify(entries)
    # Threads give the same answer in the same order.
    assert verify(entries, on_error="skip", workers=3).entries == result.entries


def test_corrupt_file_raises_when_read(small_tree, tmp_path):
    lst = write_list(tmp_path / "list.txt", ["a/one.png 0", "b/corrupt.png 1"])
    entries, _ = read_image_list(lst, small_tree)
    images = FileImageSet("s", entries, ReadOptions(standard_transform("resize", 16)))
    assert images[0]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match=rf"{lst}:2: .*corrupt\.png.*data.on_error=skip"):
        images[1]


def test_read_options_are_checked_and_sets_pool_only_when_they_decode_alike(small_tree):
    with pytest.raises(ValueError, match="channels=2, use 1 or 3"):
        ReadOptions(channels=2)
    with pytest.raises(ValueError, match="on_error='ignore'"):
        ReadOptions(on_error="ignore")
    with pytest.raises(ValueError, match="transform is None"):
        FileImageSet("s", [], ReadOptions())
    with pytest.raises(ValueError, match="needs ReadOptions.resolution"):
        build_file_benchmark("cifar10", small_tree, ReadOptions())
    one, two = read_image_folder(small_tree / "a")
    transform = standard_transform("resize", 16)
    first = FileImageSet("one", [one], ReadOptions(transform))
    assert first.options.resolution == 16  # the transform's output size
    pooled = FileImageSet.pooled("both", [first, FileImageSet("two", [two], ReadOptions(transform, workers=4))], "val")
    assert pooled.ids == ["one.png", "two.jpg"] and pooled.split == "val"  # bad-file handling does not matter
    with pytest.raises(ValueError, match="decode images differently"):
        FileImageSet.pooled("both", [first, FileImageSet("two", [two], ReadOptions(transform, channels=1))], "val")


# --------------------------------------------------------------------------- colour and preprocessing


def test_grayscale_raises_or_converts(small_tree):
    entry = read_image_folder(small_tree / "b", extensions=(".png",))
    gray = [e for e in entry if e.id == "gray.png"]
    transform = standard_transform("resize", 16)
    with pytest.raises(DataError, match=r"gray\.png.*grayscale.*data.allow_grayscale=true"):
        FileImageSet("s", gray, ReadOptions(transform))[0]
    with pytest.raises(DataError, match="allow_grayscale"):
        verify(gray)
    image = FileImageSet("s", gray, ReadOptions(transform, convert_grayscale=True))[0]["image"]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    result = verify(gray, convert_grayscale=True)
    assert result.grayscale == ["gray.png"] and result.problems == []
    skipped = verify(gray, on_error="skip")
    assert skipped.entries == [] and "allow_grayscale" in skipped.problems[0].reason
    # A 1-channel benchmark takes grayscale as it is and converts RGB to luma.
    assert FileImageSet("s", gray, ReadOptions(transform, channels=1))[0]["image"].shape == (1, 16, 16)


def test_colour_modes():
    rgb = Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert not is_grayscale(rgb) and not is_grayscale(rgb.convert("RGBA")) and not is_grayscale(rgb.convert("CMYK"))
    assert is_grayscale(rgb.convert("L")) and is_grayscale(rgb.convert("LA")) and is_grayscale(rgb.convert("1"))
    assert not is_grayscale(rgb.convert("P"))  # a colour palette
    assert is_grayscale(rgb.convert("L").convert("P"))  # a palette with gray colours only
    for mode in ("RGBA", "CMYK", "P"):
        assert to_mode(rgb.convert(mode), 3, False, "x").mode == "RGB"
        assert to_mode(rgb.convert(mode), 1, False, "x").mode == "L"
    # 16-bit gray is scaled to 8 bits, not clipped at 255.
    deep = Image.fromarray(np.array([[0, 32896], [65535, 65535]], dtype=np.uint16))
    assert np.asarray(to_mode(deep, 1, False, "x")).tolist() == [[0, 128], [255, 255]]
    with pytest.raises(DataError, match="x: grayscale"):
        to_mode(deep, 3, False, "x")


def test_square_resize_gives_size_and_range():
    image = Image.fromarray(RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = standard_transform("resize", 32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.5


def test_resize_center_crop_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    for w, h in [(300, 200), (200, 333), (256, 256), (500, 375)]:
        image = Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = standard_transform("resize_center_crop", 224, resize=256)(image)
        assert ours.shape == (3, 224, 224)
        reference = tv.Compose([tv.Resize(256), tv.CenterCrop(224), tv.ToTensor()])(image)
        assert torch.allclose(ours, reference, atol=1e-6), (w, h)
    assert standard_transform("resize_center_crop", 32).resize == 32  # resize defaults to the crop size
    with pytest.raises(ValueError, match="resize >= crop"):
        ResizeCenterCrop(200, 224)
    with pytest.raises(ValueError, match="unknown transform kind"):
        standard_transform("crop", 32)


# --------------------------------------------------------------------------- folders


def test_folder_reading_is_deterministic(tmp_path):
    root = tmp_path / "folder"
    for rel in ["z/3.png", "a/2.jpg", "a/10.png", "m/sub/1.PNG", ".hidden/x.png", "a/.x.png"]:
        write_image(root / rel)
    (root / "a/notes.txt").write_text("not an image")
    entries = read_image_folder(root)
    assert [e.id for e in entries] == ["a/10.png", "a/2.jpg", "m/sub/1.PNG", "z/3.png"]
    assert all(e.label == OOD_LABEL for e in entries)
    assert [e.id for e in read_image_folder(root)] == [e.id for e in entries]
    classes = read_image_folder(root, class_folders=True)
    assert [(e.id, e.label) for e in classes] == [("a/10.png", 0), ("a/2.jpg", 0), ("m/sub/1.PNG", 1), ("z/3.png", 2)]
    write_image(root / "loose.png")
    with pytest.raises(DataError, match="not inside a class sub-folder"):
        read_image_folder(root, class_folders=True)
    with pytest.raises(DataError, match="no images"):
        read_image_folder(root / "a", extensions=(".gif",))

    s = folder_set(root, "mine", ReadOptions(standard_transform("resize", 8)))
    assert s.ids[0] == "mine/a/10.png" and len(s) == 5 and (s.labels == OOD_LABEL).all()
    sample = s[0]
    assert sample["set"] == "mine" and sample["split"] == "test" and sample["image"].shape == (3, 8, 8)


# --------------------------------------------------------------------------- benchmarks

# Images per list of the tiny CIFAR-10-style tree (list file stem -> count).
COUNTS = {
    "train_cifar10": 6, "val_cifar10": 2, "test_cifar10": 4, "test_cifar100": 3, "val_tin": 2, "test_tin": 3,
    "test_mnist": 2, "test_svhn": 2, "test_texture": 2, "test_places365": 2,
}


def cifar_tree(root: Path) -> Path:
    """An OpenOOD-style CIFAR-10 data root: benchmark_imglist/cifar10/*.txt and images_classic/."""
    images = root / "images_classic"
    for stem, count in COUNTS.items():
        split, name = stem.split("_", 1)
        lines = []
        for k in range(count):
            rel = f"{name}/{split}/{k:03d}.{'jpg' if name == 'texture' else 'png'}"
            size = (48, 40) if name == "texture" else (32, 32)
            write_image(images / rel, size, mode="L" if name == "mnist" else "RGB")
            lines.append(f"{rel} {k % 10 if name == 'cifar10' else -1}")
        write_list(root / "benchmark_imglist" / "cifar10" / f"{stem}.txt", lines)
    return root


def test_openood_definitions_are_complete():
    cifar, imagenet = OPENOOD_BENCHMARKS["cifar10"], OPENOOD_BENCHMARKS["imagenet"]
    assert [n for n, s in cifar["ood"].items() if s["group"] == "near"] == ["cifar100", "tin"]
    assert [n for n, s in imagenet["ood"].items() if s["group"] == "far"] == ["inaturalist", "textures", "openimage_o"]
    assert cifar["ood"]["tin"]["val"]["list"] == "benchmark_imglist/cifar10/val_tin.txt"
    assert imagenet["ood"]["openimage_o"]["val"]["list"] == "benchmark_imglist/imagenet/val_openimage_o.txt"
    assert imagenet["ind"]["train"]["list"] == "benchmark_imglist/imagenet/train_imagenet.txt"
    assert imagenet["ood"]["textures"]["test"]["data_dir"] == "images_classic"


def test_build_file_benchmark(tmp_path):
    root = cifar_tree(tmp_path / "data")
    b = build_file_benchmark("cifar10", root, ReadOptions(resolution=32, convert_grayscale=True, verify_files=True))
    assert (b.name, b.num_classes, b.channels, b.resolution) == ("cifar10", 10, 3, 32)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 2, 4)
    assert b.ood_names("near") == ["cifar100", "tin"]
    assert b.ood_names("far") == ["mnist", "svhn", "texture", "places365"]
    for name, s in b.ood.items():
        assert len(s.test) == COUNTS[f"test_{name}"]
        assert len(s.val) == (2 if name == "tin" else 0)  # only TIN has an OOD validation list
    for split, name, s in b.all_sets():
        assert isinstance(s, FileImageSet) and s.split == split and s.name == name
        if len(s):
            sample = s[0]
            assert sample["image"].shape == (3, 32, 32) and sample["split"] == split and sample["set"] == name
            assert sample["id"] == s.ids[0] and sample["id"].startswith(name if name != IND else "cifar10/")
        assert (s.labels == OOD_LABEL).all() if name != IND else (s.labels >= 0).all()
    assert b.ood["texture"].test.ids == ["texture/test/000.jpg", "texture/test/001.jpg"]
    report = data_report(b)
    assert report["skipped"] == 0 and report["grayscale_converted"] == 2
    assert report["sets"]["mnist/test"]["grayscale_converted"] == 2

    sets = [b.test] + [s.test for s in b.ood.values()]
    loader = DataLoader(ConcatDataset(sets), batch_size=5, num_workers=1)
    batches = list(loader)
    assert sum(len(batch["id"]) for batch in batches) == 4 + 14
    assert batches[0]["image"].shape == (5, 3, 32, 32) and batches[0]["image"].dtype == torch.float32
    assert sorted(i for batch in batches for i in batch["id"]) == sorted(i for s in sets for i in s.ids)

    module = BenchmarkDataModule(DataConfig(batch_size=4, eval_batch_size=8), test_ood=True, benchmark=b)
    module.setup()
    assert next(iter(module.train_dataloader()))["image"].shape == (4, 3, 32, 32)
    assert sum(len(batch["id"]) for batch in module.test_dataloader()) == 18

    # The ImageSet-style surface used elsewhere: subset and sliced images.
    head = b.test.subset(range(2))
    assert head.ids == b.test.ids[:2] and head.split == "test"
    assert b.test.images[1:3].shape == (2, 3, 32, 32) and b.test.images.shape == (4, 3, 32, 32)
    assert torch.equal(b.test.images[0], b.test[0]["image"])


def test_build_file_benchmark_errors_and_skip(tmp_path):
    root = cifar_tree(tmp_path / "data")
    # Grayscale MNIST in an RGB benchmark: an error naming the image and the fix, unless converted.
    with pytest.raises(DataError, match=r"test_mnist\.txt:1: .*mnist/test/000\.png.*allow_grayscale"):
        build_file_benchmark("cifar10", root, ReadOptions(resolution=32, verify_files=True))
    lazy = build_file_benchmark("cifar10", root, ReadOptions(resolution=32))  # without verification it fails when read
    with pytest.raises(DataError, match="allow_grayscale"):
        lazy.ood["mnist"].test[0]

    svhn = root / "benchmark_imglist/cifar10/test_svhn.txt"
    write_corrupt(root / "images_classic/svhn/test/bad.png")
    svhn.write_text(svhn.read_text() + "svhn/test/bad.png -1\nsvhn/test/000.png\n")
    with pytest.raises(DataError, match=rf"{svhn}:4: .*no label"):
        build_file_benchmark("cifar10", root, ReadOptions(resolution=32, convert_grayscale=True))
    b = build_file_benchmark("cifar10", root, ReadOptions(resolution=32, on_error="skip", convert_grayscale=True,
                                                      workers=2))
    assert len(b.ood["svhn"].test) == 2
    report = data_report(b)
    assert report["skipped"] == 2 and report["sets"]["svhn/test"]["skipped"] == 2
    assert {p["line"] for p in report["sets"]["svhn/test"]["problems"]} == {3, 4}
    assert report["grayscale_converted"] == 2

    # Skip mode without grayscale conversion drops the grayscale images; a list left empty is an error.
    with pytest.raises(DataError, match="no usable images left in set 'mnist'"):
        build_file_benchmark("cifar10", root, ReadOptions(resolution=32, on_error="skip"))


def test_build_file_benchmark_checks_labels_ids_and_size(tmp_path):
    root = cifar_tree(tmp_path / "data")
    spec = {**OPENOOD_BENCHMARKS["cifar10"], "num_classes": 5}  # the tree's InD labels go up to 5
    with pytest.raises(DataError, match="label 5 is not an InD class"):
        build_file_benchmark(spec, root, ReadOptions(resolution=32, convert_grayscale=True))
    spec = {**OPENOOD_BENCHMARKS["cifar10"], "name": "shared"}
    spec["ood"] = {**spec["ood"], "tin": {**spec["ood"]["tin"], "val": spec["ood"]["tin"]["test"]}}
    with pytest.raises(DataError, match="ids shared between evaluated sets.*tin/val and tin/test"):
        build_file_benchmark(spec, root, ReadOptions(resolution=32, convert_grayscale=True))
    with pytest.raises(ValueError, match="resolution is 32"):
        build_file_benchmark("cifar10", root, ReadOptions(standard_transform("resize", 16), resolution=32))
    b = build_file_benchmark("cifar10", root, ReadOptions(standard_transform("resize", 16), channels=1, resolution=16))
    assert b.ood["mnist"].test[0]["image"].shape == (1, 16, 16)
    assert b.test[0]["image"].shape == (1, 16, 16)
    with pytest.raises(DataError, match="unknown benchmark"):
        build_file_benchmark("cifar100", root, ReadOptions(resolution=32))
