"""What a user meets on the first day: score_folder keeps its promises, mistakes are named before any model
loads and leave no folder behind, the classifier features are cached, and one definition of images/s."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffguard_pl import config as config_lib
from diffguard_pl.config import ConfigError, EvalConfig
from diffguard_pl.models import loading as model_loading
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.detectors.features import classifier_outputs, compute_outputs
from diffguard_pl.models import load_classifier

from helpers.configs import eval_argv

QUIET = ["callbacks.curves=false", "callbacks.score_plots=false", "callbacks.reconstructions=0"]


def write_images(folder, count, size=16, mode="L", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the models' weights fails loudly: a check that must come first shows that it does."""
    def refuse(cfg):
        raise AssertionError("the models were loaded before the check")

    monkeypatch.setattr(model_loading, "load_models", refuse)


def load(argv):
    return config_lib.load(EvalConfig, argv, None)


def test_score_folder_scores_the_whole_folder_unless_capped(tmp_path, small_models, benchmark, capsys):
    folder = write_images(tmp_path / "images", 23)
    evaluate(load(eval_argv(tmp_path / "all", small_models, f"score_folder={folder}", "limit_per_set=20", *QUIET)),
             benchmark)
    rows = list(csv.DictReader(open(tmp_path / "all" / "folder_scores.csv")))
    assert len(rows) == 23  # limit_per_set caps the InD validation images, never the user's folder
    evaluate(load(eval_argv(tmp_path / "capped", small_models, f"score_folder={folder}", "limit_per_set=20",
                            "score_folder_limit=5", *QUIET)), benchmark)
    assert len(list(csv.DictReader(open(tmp_path / "capped" / "folder_scores.csv")))) == 5
    out = capsys.readouterr().out
    assert "23 images" in out and "score_folder_limit=5" in out


def test_too_few_validation_images_are_named_before_any_model_loads(tmp_path, small_models, benchmark,
                                                                     no_model_loading):
    folder = write_images(tmp_path / "images", 3)
    with pytest.raises(ConfigError, match="at least 20 InD validation images.*limit_per_set=5"):
        evaluate(load(eval_argv(tmp_path / "out", small_models, f"score_folder={folder}", "limit_per_set=5")),
                 benchmark)
    assert not (tmp_path / "out").exists()  # an early error leaves no output folder behind


def test_converted_folder_images_are_counted_on_the_console_and_in_the_outputs(tmp_path, small_models, benchmark,
                                                                               capsys):
    folder = write_images(tmp_path / "images", 3, size=64, mode="RGB")
    write_images(folder, 2, size=16, mode="L", seed=1)  # overwrites img00, img01 with native images
    evaluate(load(eval_argv(tmp_path / "out", small_models, f"score_folder={folder}", "limit_per_set=20", *QUIET)),
             benchmark)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("score_folder"))
    assert "3 images" in line and "1 of 64x64 color" in line and "2 of 16x16 gray" in line
    assert "1 resized" in line and "1 converted to the benchmark's channel count" in line
    report = json.loads((tmp_path / "out" / "results.json").read_text())["folder"]
    assert (report["images"], report["resized"], report["channels_converted"]) == (3, 1, 1)


@pytest.mark.parametrize("mistake, message", [
    ("data.resolution=32", "data.resolution=32 / data.channels=1 do not fit the diffusion model"),
    ("score_folder=/nonexistent/folder", "score_folder=/nonexistent/folder: image folder"),
])
def test_mistakes_are_named_before_any_model_loads_and_leave_no_folder(tmp_path, small_models, benchmark,
                                                                        no_model_loading, mistake, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(load(eval_argv(tmp_path / "out", small_models, mistake)), benchmark)
    assert not (tmp_path / "out").exists()


def test_classifier_features_are_cached_per_classifier_and_set(tmp_path, benchmark, small_models, monkeypatch, capsys):
    monkeypatch.setenv("DIFFGUARD_CACHE", str(tmp_path / "cache"))
    classifier = load_classifier(small_models / "classifier")
    images = benchmark.val
    first = classifier_outputs(classifier, images, 64, what="InD validation images")
    assert "read from the cache" not in capsys.readouterr().err
    second = classifier_outputs(classifier, images, 64, what="InD validation images")
    assert "read from the cache" in capsys.readouterr().err
    for a, b, c in zip(first, second, compute_outputs(classifier, images, 64)):
        assert torch.equal(a, b) and torch.equal(a, c)
    with torch.no_grad():
        classifier.model.get_classifier().bias.add_(1.0)  # another classifier: its own entry
    classifier_outputs(classifier, images, 64, what="InD validation images")
    assert "read from the cache" not in capsys.readouterr().err
    classifier_outputs(classifier, images.subset(range(10)), 64, what="InD validation images")  # another set
    assert "read from the cache" not in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3


def test_one_definition_of_images_per_second_also_after_a_resume(tmp_path, small_models, benchmark, capsys):
    argv = eval_argv(tmp_path / "out", small_models, *QUIET)
    results = evaluate(load(argv), benchmark)
    speed = results["throughput"]
    assert speed["images"] == 48 and speed["images_per_second"] == pytest.approx(48 / speed["loop_seconds"])
    assert speed["wall_seconds"] > speed["loop_seconds"] > 0 and "test loop" in speed["definition"]
    out = capsys.readouterr().out
    assert f"{speed['images_per_second']:.2f} images/s" in out
    again = evaluate(load(argv), benchmark)  # everything finished: nothing evaluated, no nan anywhere
    assert again["throughput"]["images"] == 0 and again["throughput"]["images_per_second"] is None
    assert "nan" not in json.dumps(again["throughput"]) and "no image evaluated in this run" in capsys.readouterr().out


def write_bad_images(folder):
    """Two files that cannot be scored: one is no image at all, the other a PNG whose header reads but whose pixels
    are cut off (only decoding finds it)."""
    (folder / "garbage.png").write_bytes(b"this is not an image")
    good = (folder / "img00.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])


def test_a_corrupt_folder_image_is_refused_before_any_model_loads(tmp_path, small_models, benchmark,
                                                                  no_model_loading, capsys):
    from diffguard_pl import cli

    folder = write_images(tmp_path / "images", 4)
    write_bad_images(folder)
    argv = eval_argv(tmp_path / "out", small_models, f"score_folder={folder}", "limit_per_set=20")
    code = cli.run(EvalConfig, lambda cfg: evaluate(cfg, benchmark), argv, None, "evaluate.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: score_folder="), err
    assert str(folder / "garbage.png") in err[0] and str(folder / "truncated.png") in err[0]  # every bad file named
    assert "2 of its 6 images cannot be used" in err[0] and "data.on_error=skip" in err[0]  # and the fix
    assert not (tmp_path / "out").exists()


def test_skipped_folder_images_are_named_counted_alike_and_on_error_keeps_the_fingerprint(tmp_path, small_models,
                                                                                          benchmark, capsys):
    from diffguard_pl.records import store

    folder = write_images(tmp_path / "images", 4)
    argv = eval_argv(tmp_path / "out", small_models, f"score_folder={folder}", "limit_per_set=20", *QUIET)
    evaluate(load(argv), benchmark)  # a first run on the good images
    write_bad_images(folder)
    skip = load(argv + ["data.on_error=skip"])
    assert store.fingerprint(store.result_config(skip)) == store.fingerprint(store.result_config(load(argv)))
    capsys.readouterr()
    results = evaluate(skip, benchmark)  # the same output_dir: resumed, not refused as another config's
    out = capsys.readouterr().out
    assert "resuming: 24 of 24 samples already finished" in out and "no sample left to evaluate" in out
    assert "2 of them left out (data.on_error=skip" in out
    assert f"  {folder / 'garbage.png'}: cannot decode" in out and f"  {folder / 'truncated.png'}: cannot decode" in out
    report = results["folder"]
    assert report["images"] == 6 and report["skipped"] == 2 == len(report["problems"])
    assert sorted(p["file"] for p in report["problems"]) == [str(folder / "garbage.png"), str(folder / "truncated.png")]
    assert sum(report["sizes"].values()) == 4 == len(list(csv.DictReader(open(tmp_path / "out" / "folder_scores.csv"))))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["folder"] == report


def test_a_dry_run_with_score_folder_prints_the_folders_plan(tmp_path, small_models, benchmark, capsys):
    folder = write_images(tmp_path / "images", 5)
    write_bad_images(folder)
    argv = eval_argv(tmp_path / "out", small_models, f"score_folder={folder}", "limit_per_set=20",
                     "data.on_error=skip", "score_folder_limit=3", "dry_run=true")
    assert evaluate(load(argv), benchmark) is None
    out = capsys.readouterr().out
    assert "score_folder: 3 folder images, each judged in or out at every detector's threshold set on 20 InD " \
           "validation images" in out
    assert "  folder test: 3 images" in out and "of 5 usable (score_folder_limit=3" in out
    assert "2 left out by data.on_error=skip" in out and "  ind val: 20 images (InD validation" in out
    assert "for 23 images" in out  # the UNet evaluations of the folder's run
    assert "ind test" not in out and "digits_6to9" not in out  # not the benchmark's test plan
    assert not (tmp_path / "out").exists()
