"""score_folder answers "which of these images are OOD?": a folder of its own by default, a verdict at the
preset's recommended detector that matches the CSV, the recommended detector's columns first and explained,
a results.json without nulls, and histograms of the folder against InD validation with the threshold."""

import contextlib
import csv
import dataclasses
import io
import json
import re

import pytest

from diffguard_pl import cli
from diffguard_pl.callbacks import score_plots
from diffguard_pl.config import ConfigError, EvalConfig, load
from diffguard_pl.data.benchmark import IND
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.jobs.folder import FOLDER, compact

from helpers.configs import eval_argv
from test_first_day import QUIET, write_images

RECOMMENDED = "diffguard+vim"  # a derived detector: the verdict reads the report's columns, not only the loop's
NAMES = ["zero", "one", "two", "three", "four", "five"]


def folder_argv(out, models, folder, *extra):
    return eval_argv(out, models, f"score_folder={folder}", "limit_per_set=20", *extra)


def without_output_dir(argv):
    return [a for a in argv if not a.startswith("output_dir=")]


def test_a_folder_run_writes_to_a_folder_of_its_own_unless_output_dir_is_given(tmp_path, small_models, benchmark,
                                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = write_images(tmp_path / "my_images", 4)
    argv = without_output_dir(folder_argv(tmp_path / "unused", small_models, folder, *QUIET))
    assert cli.run(EvalConfig, lambda cfg: evaluate(cfg, benchmark), argv, None, "evaluate.py") == 0
    own = tmp_path / "outputs" / "digits_gdm" / "folders" / "my_images"  # the preset's output_dir, then its own
    assert len(list(csv.DictReader(open(own / "folder_scores.csv")))) == 4
    assert not (tmp_path / "outputs" / "digits_gdm" / "records").exists()  # the benchmark run's folder untouched
    assert f"score_folder: writing to {own.relative_to(tmp_path)}" in capsys.readouterr().out

    def output_dir(*argv):
        assert cli.run(EvalConfig, lambda cfg: None, [*argv, "print_config=true"], None, "evaluate.py") == 0
        return re.search(r"^output_dir: (.*)$", capsys.readouterr().out, re.M).group(1)

    assert output_dir(*argv, f"output_dir={tmp_path / 'mine'}") == str(tmp_path / "mine")  # given: used as given
    assert output_dir(*[a for a in argv if not a.startswith("score_folder=")]) == "outputs/digits_gdm"  # the preset's
    assert output_dir(*argv, f"score_folder={folder}/") == str(own.relative_to(tmp_path))  # a trailing slash


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, small_models, benchmark):
    """One folder run with the score histograms on (the plot function's calls recorded) and class names."""
    root = tmp_path_factory.mktemp("folder_run")
    folder = write_images(root / "images", 12)
    named = dataclasses.replace(benchmark, class_names=NAMES)
    calls = []
    original = score_plots.histogram_figure

    def recording(by_set, detector, *args, **kwargs):
        calls.append((detector, {s: list(v) for s, v in by_set.items()}, kwargs))
        return original(by_set, detector, *args, **kwargs)

    argv = folder_argv(root / "out", small_models, folder, f"recommended={RECOMMENDED}", "callbacks.curves=false",
                       "callbacks.reconstructions=0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(score_plots, "histogram_figure", recording)
        console = io.StringIO()
        with contextlib.redirect_stdout(console):
            results = evaluate(load(EvalConfig, argv, None), named)
    return root / "out", results, console.getvalue(), calls


def read_csv(out):
    with open(out / "folder_scores.csv") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def test_the_verdict_counts_the_recommended_detectors_out_column_and_names_the_extremes(folder_run):
    out, results, console, _ = folder_run
    _, rows = read_csv(out)
    threshold = json.loads((out / "thresholds.json").read_text())["thresholds"][RECOMMENDED]
    flagged = sum(int(r[f"out/{RECOMMENDED}"]) for r in rows)
    assert flagged == sum(float(r[RECOMMENDED]) > threshold for r in rows)
    lines = console.rstrip().splitlines()
    verdict = next(i for i, line in enumerate(lines) if line.startswith(f"score_folder: out at {RECOMMENDED} "))
    assert lines[verdict].endswith(f": {flagged} of 12 images") and "keeps 95% of InD validation" in lines[verdict]
    ranked = sorted(rows, key=lambda r: (-float(r[RECOMMENDED]), r["id"]))
    shown = lambda r: f"    {r['id'][len(FOLDER) + 1:]}: predicted {NAMES[int(r['pred'])]}, "  # noqa: E731
    assert lines[verdict + 1] == "  most OOD:" and lines[verdict + 7] == "  least OOD:"
    assert [line.split(", score")[0] + ", " for line in lines[verdict + 2:verdict + 7]] == list(map(shown, ranked[:5]))
    assert [line.split(", score")[0] + ", " for line in lines[verdict + 8:verdict + 13]] == \
        list(map(shown, ranked[::-1][:5]))
    assert lines[-1].startswith("  wrote ") and str(out / "folder_scores.csv") in lines[-1]  # the console ends here
    assert str(out / "results.json") in lines[-1] and str(score_plots.plot_path(out, RECOMMENDED)) in lines[-1]
    assert results["verdict"] == {"recommended": RECOMMENDED, "detector": RECOMMENDED, "threshold": threshold,
                                  "out": flagged, "images": 12}
    assert results["out_per_detector"][RECOMMENDED] == flagged


def test_the_csv_puts_the_recommended_detector_first_and_says_what_each_column_means(folder_run):
    out, _, _, _ = folder_run
    header, rows = read_csv(out)
    assert header[:5] == ["id", "pred", "pred_name", RECOMMENDED, f"out/{RECOMMENDED}"]
    assert header.count(RECOMMENDED) == 1 and "diffguard" in header and "out/diffguard" in header
    assert all(r["pred_name"] == NAMES[int(r["pred"])] for r in rows)
    dictionary = json.loads((out / "folder_columns.json").read_text())
    assert dictionary["file"] == "folder_scores.csv" and dictionary["recommended"] == RECOMMENDED
    assert list(dictionary["columns"]) == header and all(e["meaning"] for e in dictionary["columns"].values())
    assert dictionary["columns"][RECOMMENDED]["meaning"].startswith("the recommended detector")


def test_a_folder_runs_results_json_has_no_empty_field(folder_run):
    out, results, _, _ = folder_run
    text = (out / "results.json").read_text()
    assert "null" not in text and "NaN" not in text and json.loads(text) == results == compact(results)
    assert {"ind_val_accuracy", "folder", "verdict", "thresholds", "out_per_detector", "throughput"} <= set(results)
    assert "detectors" not in results and "num_samples" not in results  # no per-set metrics without OOD sets
    assert results["folder"]["images"] == results["folder"]["scored"] == 12 and results["folder"]["skipped"] == 0
    assert 0 <= results["ind_val_accuracy"] <= 1 and results["thresholds"]["ind_val_samples"] == 20
    assert compact({"a": None, "b": float("nan"), "c": {"d": None}, "e": [], "f": 0, "g": [{}, 1]}) == {"f": 0, "g": [1]}


def test_the_histograms_show_the_folder_against_ind_validation_with_the_threshold(folder_run):
    out, _, _, calls = folder_run
    thresholds = json.loads((out / "thresholds.json").read_text())["thresholds"]
    drawn = {detector: (by_set, kwargs) for detector, by_set, kwargs in calls}
    assert [detector for detector, _, _ in calls][:2] == [RECOMMENDED, "diffguard"]  # the verdict's first
    for detector in (RECOMMENDED, "diffguard"):
        by_set, kwargs = drawn[detector]
        assert {s: len(v) for s, v in by_set.items()} == {IND: 20, FOLDER: 12}
        assert kwargs["threshold"] == thresholds[detector] and "against InD validation" in kwargs["title"]
        assert score_plots.plot_path(out, detector).is_file()


def test_the_histogram_draws_the_threshold_and_the_given_labels():
    fig = score_plots.histogram_figure({IND: [0.1, 0.2, 0.3], FOLDER: [0.5, 0.9]}, "x", {"meaning": "m"}, {},
                                       threshold=0.25, title="x: folder images", labels={IND: "InD validation"})
    ax = fig.axes[0]
    assert [line.get_xdata()[0] for line in ax.lines] == [0.25]
    assert [t.get_text() for t in ax.get_legend().get_texts()][::2] == ["InD validation", "threshold 0.25 (out above)"]
    assert ax.get_title().startswith("x: folder images\n")


def test_recommended_names_a_detector_the_run_reports(capsys):
    folder = {"score_folder": "images"}
    with pytest.raises(ConfigError, match=r"recommended='knn\+ebo', score_folder's verdict, is no detector this run "
                                          r"reports: name one of \[.*'diffguard\+ebo\+knn', 'ebo\+knn'\]"):
        EvalConfig(fusion_partners=["ebo+knn"], recommended="knn+ebo", **folder)
    assert EvalConfig(fusion_partners=["ebo+knn"], recommended="ebo+knn", **folder).recommended == "ebo+knn"
    assert EvalConfig(recommended="diffguard+vim", **folder).recommended == "diffguard+vim"
    assert EvalConfig().recommended == "diffguard"
    # A benchmark run that changes the preset's partners is not refused for the verdict it does not give.
    assert EvalConfig(fusion_partners=["ebo"], recommended="ebo+knn").fusion_partners == ["ebo"]
    for preset in ("fashion_gdm", "fashion_classifier_free"):
        cfg = load(EvalConfig, ["--config", preset], None)
        assert cfg.recommended == "gmm+she+lts" and "gmm+she+lts" in cfg.fusion_partners
    assert cli.run(EvalConfig, lambda cfg: None, ["recommended=nope", "score_folder=x"], None, "evaluate.py") == 2
    assert capsys.readouterr().err.startswith("error: recommended='nope', score_folder's verdict, is no detector")


def test_sample_images_saves_a_folder_to_try_score_folder_on(tmp_path, benchmark, capsys):
    import numpy as np
    from PIL import Image

    from diffguard_pl.data.selection import subset_by_id
    from diffguard_pl.jobs import sample_images

    near = benchmark.ood_names("near")[0]
    written = sample_images.save_images(benchmark, [IND, near], 3, tmp_path / "images")
    chosen = subset_by_id(benchmark.test, 3)
    assert [p.name for p in written[:3]] == [sample_images.file_name(IND, chosen[i]["id"]) for i in range(3)]
    assert len(written) == 6 and all(p.name.startswith(f"{near}_") for p in written[3:])
    pixels = np.asarray(Image.open(written[0]), dtype=np.float32) / 255  # the image, to rounding
    assert np.abs(pixels - chosen[0]["image"][0].numpy()).max() <= 0.5 / 255 + 1e-6
    assert sample_images.main([str(tmp_path / "x"), "--config", "digits_gdm", "--set", "nope"]) == 2
    assert "--set nope: the benchmark digits has the sets ind, " in capsys.readouterr().err


def test_a_recommended_detector_without_scores_gives_way_to_diffguard_and_says_so():
    from diffguard_pl.jobs.folder import verdict_detector

    assert verdict_detector("gmm+she+lts", {"diffguard": 1.0, "gmm+she+lts": 2.0}) == ("gmm+she+lts", None)
    detector, note = verdict_detector("gmm+she+lts", {"diffguard": 1.0})
    assert detector == "diffguard" and note.startswith("recommended=gmm+she+lts has no scores in this run")
