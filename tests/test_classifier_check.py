"""A classifier that does not belong to the benchmark is refused before the evaluation's work (issue 32): the rules,
the refusal (no output folder, no loop), the override, and what train.py records for it."""

import json
import shutil

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig
from diffguard_pl.detectors.classifier_check import (
    MARGIN, MIN_IMAGES, accuracy, chance_limit, check_classifier_fits, validation_accuracy,
)
from diffguard_pl.detectors.features import classifier_digest
from diffguard_pl.errors import ConfigError
from diffguard_pl.jobs import eval_job
from diffguard_pl.models import load_classifier
from diffguard_pl.models.classifier import META_FILE

from helpers.configs import eval_argv
from helpers.paths import CHECKPOINTS

CHECKED = "models.allow_classifier_mismatch=false"  # eval_argv allows its random classifier: the check back on
QUIET = ["callbacks.curves=false", "callbacks.score_plots=false", "callbacks.reconstructions=0"]


# ------------------------------------------------------------------------------------------------- the rules


def test_chance_limit_is_twice_chance_at_most_halfway_to_certainty():
    assert chance_limit(6) == pytest.approx(2 / 6) and chance_limit(1000) == pytest.approx(0.002)
    assert chance_limit(2) == pytest.approx(0.75) and chance_limit(3) == pytest.approx(2 / 3)


def test_accuracy_counts_labelled_samples_only():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    assert accuracy(logits, torch.tensor([0, 0, -1, 1])) == (pytest.approx(2 / 3), 3)
    assert accuracy(logits, torch.full((4,), -1)) == (None, 0)


def test_a_fitting_classifier_passes():
    assert check_classifier_fits(0.93, 500, 6, 0.94, ["a", "b"], ["a", "b"]) is None
    assert check_classifier_fits(0.93, 500, 6) is None  # nothing recorded, nothing known about the classes
    assert check_classifier_fits(0.94 - MARGIN + 0.001, 500, 6, 0.94) is None  # within the margin


@pytest.mark.parametrize("measured, images, recorded, names, found", [
    (0.9, 500, None, (["b", "a"], ["a", "b"]), "in another order than the benchmark's (a, b)"),
    (0.9, 500, None, (["0", "1"], ["a", "b"]), "its classes (0, 1) are not the benchmark's (a, b)"),
    (0.2, 500, None, (None, None), "20.0% InD validation accuracy on 500 images is near chance (16.7% for 6"),
    (0.7, 500, 0.94, (None, None), "24.0 points below the 94.0% recorded at training (refused beyond 15"),
    (0.2, 500, 0.94, (["0"], ["a"]), "not the benchmark's (a); its 20.0% InD validation accuracy on 500 images is "
                                     "near chance"),
])
def test_each_rule_names_the_problem(measured, images, recorded, names, found):
    problem = check_classifier_fits(measured, images, 6, recorded, *names)
    assert problem is not None and found in problem, problem


def test_too_few_images_judge_the_class_names_only():
    assert check_classifier_fits(0.0, MIN_IMAGES - 1, 6, 0.99) is None
    assert "not the benchmark's" in check_classifier_fits(0.0, MIN_IMAGES - 1, 6, 0.99, ["x"], ["y"])


# ----------------------------------------------------------------------------------- in the evaluation (stage 3)


def checked_argv(tmp_path, models, *extra):
    return eval_argv(tmp_path / "out", models, CHECKED, *QUIET, *extra)


def reordered_classifier(tmp_path):
    """The committed digits classifier, its recorded class names in another order (its weights as they are)."""
    folder = tmp_path / "classifier"
    shutil.copytree(CHECKPOINTS / "classifier", folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


@pytest.fixture
def no_loop(monkeypatch):
    """Stages 4-7 fail loudly: a refusal that must come first shows that it does."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run went past stage 3")

    monkeypatch.setattr(eval_job, "prepare_output_dir", refuse)
    monkeypatch.setattr(eval_job, "_evaluate", refuse)


def test_a_classifier_at_chance_is_refused_naming_both_numbers_and_the_flag(tmp_path, small_models, benchmark,
                                                                            no_loop, monkeypatch):
    monkeypatch.setenv("DIFFGUARD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "recorded"
    shutil.copytree(small_models / "classifier", folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta["trained_on"] = {"benchmark": "digits", "validation_accuracy": 0.9, "validation_images": len(benchmark.val)}
    (folder / META_FILE).write_text(json.dumps(meta))
    cfg = config_lib.load(EvalConfig, checked_argv(tmp_path, small_models, f"models.classifier={folder}"), None)
    with pytest.raises(ConfigError) as info:
        eval_job.evaluate(cfg, benchmark)
    message = str(info.value)
    assert f"the classifier {folder} (models.classifier) does not fit benchmark digits" in message
    assert f"its 16.7% InD validation accuracy on {len(benchmark.val)} images is near chance" in message
    assert "73.3 points below the 90.0% recorded at training" in message
    assert "models.allow_classifier_mismatch=true" in message and f"{CHECKPOINTS / 'classifier'}" in message
    assert not (tmp_path / "out").exists()


def test_class_names_in_another_order_are_refused_even_at_full_accuracy(tmp_path, small_models, benchmark, no_loop,
                                                                        capsys):
    cfg = config_lib.load(EvalConfig, checked_argv(tmp_path, small_models, "dry_run=true",
                                                   f"models.classifier={reordered_classifier(tmp_path)}"), None)
    with pytest.raises(ConfigError, match=r"are in another order than the benchmark's \(0, 1, 2, 3, 4, 5\).*"
                                          r"trained on these classes in another order"):
        eval_job.evaluate(cfg, benchmark)  # a dry run checks too
    assert "classifier: 100.0% InD validation accuracy on 162 images (recorded at training on digits: 100.0%)" \
        in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_fitting_classifier_passes_and_prints_its_accuracy(tmp_path, small_models, benchmark, capsys):
    cfg = config_lib.load(EvalConfig, checked_argv(tmp_path, small_models, "dry_run=true",
                                                   f"models.classifier={CHECKPOINTS / 'classifier'}"), None)
    assert eval_job.evaluate(cfg, benchmark) is None
    measured, n = validation_accuracy(load_classifier(CHECKPOINTS / "classifier"), benchmark.val, 64, cache=False)
    assert n == len(benchmark.val) == 162 and measured >= 0.97
    out = capsys.readouterr().out
    assert (f"classifier: {100 * measured:.1f}% InD validation accuracy on 162 images (recorded at training on "
            f"digits: 100.0%)") in out and "dry run: every file and model is in place" in out


def test_the_flag_evaluates_anyway_with_a_warning_and_results_keep_the_numbers(tmp_path, small_models, benchmark,
                                                                               capsys):
    cfg = config_lib.load(EvalConfig, checked_argv(tmp_path, small_models, "limit_per_set=2",
                                                   "models.allow_classifier_mismatch=true"), None)
    results = eval_job.evaluate(cfg, benchmark)
    err = capsys.readouterr().err
    assert "warning: the classifier" in err and "near chance" in err and "models.allow_classifier_mismatch=true" in err
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["classifier_check"]
    assert saved == results["classifier_check"]
    assert saved["validation_accuracy"] == pytest.approx(1 / 6) and saved["validation_images"] == 162
    assert saved["recorded_accuracy"] is None and saved["allowed"] and "near chance" in saved["problem"]


# ------------------------------------------------------------------------------------- classifier.json's record


def test_old_classifier_json_without_the_record_loads(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(CHECKPOINTS / "classifier", folder)
    meta = json.loads((folder / META_FILE).read_text())
    for key in ("trained_on", "class_names", "view"):  # what older exports lacked
        meta.pop(key)
    (folder / META_FILE).write_text(json.dumps(meta))
    old, new = load_classifier(folder), load_classifier(CHECKPOINTS / "classifier")
    assert old.spec.trained_on is None and old.spec.class_names is None
    assert new.spec.trained_on["benchmark"] == "digits" and new.spec.class_names == ["0", "1", "2", "3", "4", "5"]
    new.spec.class_names = None
    assert classifier_digest(old) == classifier_digest(new)  # the record does not change the cache's key
