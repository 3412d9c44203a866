"""docs/own_data.md, run as written: its example folder, its my_data.yaml and my_eval.yaml, and every train.py /
evaluate.py command of its blocks (with tiny model sizes and step counts appended), through the entry scripts.
Also the definitions of your own data: class folders and their names, splits carved by image id, clear errors."""

import csv
import json
import re
import runpy
import shlex
import sys

import numpy as np
import pytest
from PIL import Image

from diffguard_pl.config import DataConfig, RunConfig
from diffguard_pl.data import build_benchmark
from diffguard_pl.data.definition import carve, num_classes
from diffguard_pl.errors import DataError

from helpers.paths import ROOT

PAGE = ROOT / "docs" / "own_data.md"
# appended to the page's commands: tiny models, a few steps, few images (later overrides win)
TINY_TRAIN = ["trainer.max_steps=3", "trainer.enable_progress_bar=false", "diffusion.block_out_channels=[32,32]",
              "diffusion.attention_levels=[false,true]", "diffusion.layers_per_block=1"]
TINY_EVAL = ["limit_per_set=20", "diffguard.num_steps=4", "diffguard.depth=2", "trainer.enable_progress_bar=false",
             "callbacks.curves=false", "callbacks.score_plots=false", "callbacks.reconstructions=0"]


def page_blocks() -> dict:
    """The page's fenced blocks marked ``<!-- own_data: NAME -->``, by name."""
    found = re.findall(r"<!-- own_data: (\S+) -->\n```\w*\n(.*?)```", PAGE.read_text(), flags=re.S)
    return dict(found)


def commands(block: str) -> list:
    """The commands of a bash block, each as its argv (continuation lines joined, comments dropped)."""
    text = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def run_script(argv: list, extra: list, monkeypatch, capsys) -> str:
    """``python train.py|evaluate.py ARGS`` run in this process as its script runs (exit status 0); its stdout."""
    assert argv[0] == "python" and argv[1] in ("train.py", "evaluate.py"), argv
    script = str(ROOT / argv[1])
    monkeypatch.setattr(sys, "argv", [script, *argv[2:], *extra])
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(script, run_name="__main__")
    out, err = capsys.readouterr()
    assert finished.value.code in (0, None), f"{' '.join(argv)} failed:\n{out[-2000:]}\n{err[-3000:]}"
    return out


@pytest.mark.training
def test_the_page_runs_end_to_end(tmp_path, monkeypatch, capsys):
    blocks = page_blocks()
    assert {"example", "my_data.yaml", "train", "my_eval.yaml", "evaluate", "score_folder"} <= set(blocks)
    monkeypatch.chdir(tmp_path)  # the page's relative paths (outputs/...) land here
    monkeypatch.setenv("DIFFGUARD_CACHE", str(tmp_path / "cache"))
    exec(compile(blocks["example"], "make_example.py", "exec"), {"__name__": "__main__"})
    (tmp_path / "my_data.yaml").write_text(blocks["my_data.yaml"])
    (tmp_path / "my_eval.yaml").write_text(blocks["my_eval.yaml"])

    train = commands(blocks["train"])
    assert len(train) == 3
    for argv, export in zip(train, ("classifier", "diffusion", "encoder")):
        out = run_script(argv, TINY_TRAIN, monkeypatch, capsys)
        folder = f"outputs/my_data/train_{export}/{export}"
        assert f"exported {export}: {folder}" in out and (tmp_path / folder).is_dir()

    dry_run, evaluation = commands(blocks["evaluate"])
    plan = run_script(dry_run, TINY_EVAL, monkeypatch, capsys)
    assert "InD classes (label name): 0 one, 1 two, 2 zero" in plan and "other_digits (near) test" in plan
    assert not (tmp_path / "outputs/my_data/eval/results.json").exists()
    run_script(evaluation, TINY_EVAL, monkeypatch, capsys)
    results = json.loads((tmp_path / "outputs/my_data/eval/results.json").read_text())
    assert 0.0 <= results["id_accuracy"] <= 1.0
    assert results["groups"] == {"other_digits": "near", "photos": "far"}
    for detector in ("diffguard", "diffguard/contrastive", "msp"):
        for ood_set in ("other_digits", "photos"):
            assert 0.0 <= results["detectors"][detector]["per_ood"][ood_set]["auroc"] <= 1.0

    (folder_command,) = commands(blocks["score_folder"])
    run_script(folder_command, TINY_EVAL, monkeypatch, capsys)
    rows = list(csv.DictReader(open(tmp_path / "outputs/my_data/unlabelled/folder_scores.csv")))
    assert len(rows) == 30  # every unlabelled image of the example


# --------------------------------------------------------------------------- definitions of your own data


def write_image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def class_tree(root, classes=("cat", "dog", "fox"), per_class=20):
    for k, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", 40 * k + i)
    return root


def data_config(root, definition, **kw):
    return DataConfig(benchmark="lists", root=str(root), resolution=8, channels=1, definition=definition, **kw)


def ids_and_labels(image_set):
    return dict(zip(image_set.ids, image_set.labels.tolist()))


def test_class_folders_give_labels_names_and_splits_carved_by_id(tmp_path):
    class_tree(tmp_path / "images", ("fox", "cat", "dog"))
    for i in range(30):
        write_image(tmp_path / "far" / f"{i}.png", 200)
    definition = {"name": "mine", "ind": {"folder": "images"}, "ood": {"noise": {"group": "far", "folder": "far"}}}
    bench = build_benchmark(data_config(tmp_path, definition))
    assert bench.name == "mine" and bench.num_classes == 3 and bench.class_names == ["cat", "dog", "fox"]
    splits = {split: ids_and_labels(getattr(bench, split)) for split in ("train", "val", "test")}
    every = {**splits["train"], **splits["val"], **splits["test"]}
    assert len(every) == 60 and sum(map(len, splits.values())) == 60  # disjoint, nothing lost
    assert all(label == ["cat", "dog", "fox"].index(i.split("/")[1]) for i, label in every.items())
    assert min(len(s) for s in splits.values()) > 0 and len(splits["train"]) > len(splits["test"]) > 0
    noise = bench.ood["noise"]
    assert noise.group == "far" and len(noise.val) + len(noise.test) == 30 and len(noise.val) > 0
    assert (noise.test.labels == -1).all() and not set(noise.val.ids) & set(noise.test.ids)

    # another image, or another order, moves no image to another split; another seed does
    write_image(tmp_path / "images" / "cat" / "new.png", 7)
    again = build_benchmark(data_config(tmp_path, definition))
    for split in ("train", "val", "test"):
        kept = ids_and_labels(getattr(again, split))
        assert set(splits[split]) <= set(kept) and len(kept) - len(splits[split]) <= 1
    reseeded = build_benchmark(data_config(tmp_path, definition, seed=1))
    assert set(reseeded.val.ids) != set(splits["val"])


def test_carve_is_a_hash_of_id_and_seed_and_keeps_the_fractions_on_average():
    ids = [f"images/{i}.png" for i in range(4000)]
    val, test, train = carve(ids, [0.15, 0.25], seed=0)
    assert sorted(val + test + train) == list(range(4000))
    assert abs(len(val) / 4000 - 0.15) < 0.03 and abs(len(test) / 4000 - 0.25) < 0.03
    shuffled = list(reversed(ids))
    again = carve(shuffled, [0.15, 0.25], seed=0)
    assert {shuffled[i] for i in again[0]} == {ids[i] for i in val}


def test_given_train_and_test_folders_carve_val_from_train_and_match_classes_by_name(tmp_path):
    class_tree(tmp_path / "train")
    class_tree(tmp_path / "test", ("fox", "dog"), per_class=4)  # a test folder may lack a class
    class_tree(tmp_path / "others", ("wolf",), per_class=5)
    definition = {"ind": {"train": {"folder": "train"}, "test": {"folder": "test"}},
                  "ood": {"near": {"group": "near", "val": None, "test": {"folder": "others"}}}}
    bench = build_benchmark(data_config(tmp_path, definition))
    assert bench.class_names == ["cat", "dog", "fox"] and len(bench.test) == 8
    assert {i.split("/")[1]: label for i, label in ids_and_labels(bench.test).items()} == {"dog": 1, "fox": 2}
    assert len(bench.val) > 0 and len(bench.train) + len(bench.val) == 60
    assert all(i.startswith("train/") for i in bench.val.ids)
    assert len(bench.ood["near"].val) == 0 and len(bench.ood["near"].test) == 5  # sub-folders: no labels
    assert num_classes(definition, tmp_path) == 3

    class_tree(tmp_path / "test", ("wolf",), per_class=2)  # a class the training folder lacks
    with pytest.raises(DataError, match="wolf.*training folder lacks"):
        build_benchmark(data_config(tmp_path, definition))


@pytest.mark.parametrize("change, message", [
    (lambda d, root: d.update(num_classes=4), "num_classes is 4 but .* has 3 class sub-folders"),
    (lambda d, root: d.update(class_names=["a", "b", "c"]), "class_names .* differ from the class sub-folders"),
    (lambda d, root: (root / "images" / "emu").mkdir(), "InD classes without training images: emu"),
    (lambda d, root: write_image(root / "images" / "loose.png"), "not inside a class sub-folder"),
    (lambda d, root: d.update(ind={"train": {"folder": "images"}}), r"ind\.test is missing"),
    (lambda d, root: d.update(ind={"list": "train.txt"}), "num_classes is missing: image lists give labels"),
    (lambda d, root: d.update(ood={"x": {"folder": "images"}}), r"ood\.x needs group: near or far"),
    (lambda d, root: d.update(ood={"x": {"group": "far", "folder": "a", "test": {"folder": "b"}}}),
     r"ood\.x has test, which a folder set does not take"),
    (lambda d, root: d.update(classes=3), "has classes: its keys are"),
])
def test_a_wrong_definition_is_named_with_its_fix(tmp_path, change, message):
    class_tree(tmp_path / "images", per_class=10)
    definition = {"ind": {"folder": "images"}, "ood": {}}
    change(definition, tmp_path)
    with pytest.raises(DataError, match=message):
        build_benchmark(data_config(tmp_path, definition))


def test_too_few_images_to_carve_a_split_is_named(tmp_path):
    class_tree(tmp_path / "images", per_class=1)
    with pytest.raises(DataError, match="leave its (val|test|train) split empty.*add images"):
        build_benchmark(data_config(tmp_path, {"ind": {"folder": "images"}, "ood": {}}))


def test_image_lists_take_class_names_from_the_definition(tmp_path):
    for i in range(12):
        write_image(tmp_path / "images" / f"{i}.png", i)
    (tmp_path / "train.txt").write_text("".join(f"{i}.png {i % 2}\n" for i in range(8)))
    (tmp_path / "test.txt").write_text("".join(f"{i}.png {i % 2}\n" for i in range(8, 12)))
    definition = {"num_classes": 2, "class_names": ["even", "odd"],
                  "ind": {"train": {"list": "train.txt", "data_dir": "images"},
                          "test": {"list": "test.txt", "data_dir": "images"}}, "ood": {}}
    bench = build_benchmark(data_config(tmp_path, definition, val_fraction=0.3))
    assert bench.class_names == ["even", "odd"] and bench.num_classes == 2 and len(bench.test) == 4
    definition["class_names"] = ["even"]
    with pytest.raises(DataError, match="class_names has 1 names but num_classes is 2"):
        build_benchmark(data_config(tmp_path, definition))


def test_the_pages_definition_builds_the_example_with_its_class_names(tmp_path, monkeypatch):
    from diffguard_pl import config_loading

    blocks = page_blocks()
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks["example"], "make_example.py", "exec"), {"__name__": "__main__"})
    folder = tmp_path / "elsewhere"  # a relative data.root is relative to the file's folder, not the working one
    folder.mkdir()
    (folder / "my_data.yaml").write_text(blocks["my_data.yaml"])
    (tmp_path / "outputs").rename(folder / "outputs")
    cfg = config_loading.load(RunConfig, ["--config", str(folder / "my_data.yaml")], None)
    bench = build_benchmark(cfg.data)
    assert bench.name == "my_data" and bench.class_names == ["one", "two", "zero"]
    assert len(bench.train) + len(bench.val) + len(bench.test) == 180 and len(bench.val) >= 20  # score_folder's need
    assert {name: s.group for name, s in bench.ood.items()} == {"other_digits": "near", "photos": "far"}
    assert bench.train[0]["image"].shape == (1, 16, 16)
