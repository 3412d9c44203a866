"""The diffusion detectors (DDPM-OOD, LMD, DiffPath-6D / -1D, MSMA) in evaluate.py, end to end on the small random
models with cheap params: each column equals a direct computation, the scores do not depend on the batch size, the
number of processes or an interruption, OOD and validation images never reach a fit, bad configs are named, the
training statistics are cached (a damaged entry is computed again) and results.json / columns.json describe them.

One reference run (module fixture, float64, a fresh statistics cache) is shared by most tests."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig
from diffguard_pl.data.selection import evaluation_sets, subset_by_id
from diffguard_pl.detectors import diffusion_fitting, registry
from diffguard_pl.detectors.diffusion import DiffusionDetector
from diffguard_pl.detectors.loop import DiffusionDetectorsInLoop
from diffguard_pl.errors import ConfigError
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.models import load_diffusion
from diffguard_pl.records import columns as col
from diffguard_pl.records.store import read_records

from helpers.configs import eval_argv
from helpers.paths import ROOT

DDPM_OOD, LMD, DIFFPATH, DIFFPATH_1D, MSMA = (registry.DDPM_OOD, registry.LMD, registry.DIFFPATH,
                                              registry.DIFFPATH_1D, registry.MSMA)
NAMES = [DDPM_OOD, LMD, DIFFPATH, DIFFPATH_1D, MSMA]
PARAMS = {DDPM_OOD: {"num_steps": 4, "skip": 2}, LMD: {"repetitions": 2, "num_steps": 3},
          DIFFPATH: {"num_steps": 3}, DIFFPATH_1D: {"num_steps": 3}, MSMA: {"levels": 3}}
TRAIN_SAMPLES = 120  # DiffPath-6D's 10-fold fits see 108 rows: enough for its 50- and 100-component mixtures
LIMIT = 4  # samples per set: InD val, InD test and six OOD test sets, 32 in all
BATCH = 8
PARTNERS = ["vim", DIFFPATH, f"{DDPM_OOD}+vim"]
FITTED = [d.name for d in registry.DIFFUSION_DETECTORS if d.fit_on == registry.FIT_TRAIN]


def argv(out, models, *extra, names=NAMES, params=None, partners=PARTNERS, train=TRAIN_SAMPLES):
    """evaluate.py arguments: diffusion detectors (every one) with cheap params (``PARAMS`` of ``names`` unless
    given) beside a short DiffGuard, in float64."""
    params = {name: PARAMS[name] for name in names if name in PARAMS} if params is None else params
    settings = [f"diffusion_detectors.params.{name}.{key}={value}" for name, given in params.items()
                for key, value in given.items()]
    return eval_argv(out, models, "trainer.precision=64-true", f"limit_per_set={LIMIT}",
                     f"data.eval_batch_size={BATCH}", f"diffusion_detectors.names=[{','.join(names)}]", *settings,
                     f"diffusion_detectors.train_samples={train}", "baselines.detectors=[ebo,vim]",
                     f"fusion_partners=[{','.join(partners)}]", "callbacks.reconstructions=0", "callbacks.curves=false",
                     "callbacks.score_plots=false", *extra)


def load(out, models, *extra, **kw) -> EvalConfig:
    return config_lib.load(EvalConfig, argv(out, models, *extra, **kw), None)


def read_scores(out) -> dict:
    with open(Path(out) / "scores.csv") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def detector_columns(rows: dict) -> list:
    """The columns of scores.csv that a diffusion detector gives: its own and every fusion with one."""
    first = next(iter(rows.values()))
    return [c for c in first if any(part in NAMES for part in c.split(col.FUSED_SEPARATOR))]


def assert_same_scores(a: dict, b: dict, rtol=1e-6, common=False):
    """Every score column of two scores.csv files equal (the diffusion detectors' and DiffGuard's alike);
    ``common``: the columns both have (a run of fewer detectors), else the same columns."""
    assert a.keys() == b.keys()
    columns = [c for c in next(iter(a.values())) if c in next(iter(b.values()))]
    assert common or columns == list(next(iter(a.values()))) == list(next(iter(b.values())))
    for sample_id, row in a.items():
        for column, value in ((c, row[c]) for c in columns):
            if column in (col.ID, col.SET, col.SPLIT):
                assert value == b[sample_id][column]
            else:
                assert float(value) == pytest.approx(float(b[sample_id][column]), rel=rtol, abs=1e-12), \
                    (sample_id, column)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_models, benchmark):
    """One uninterrupted run from an empty statistics cache, recording what the diffusion detectors' statistics
    and fits saw while fit_diffusion_detectors ran (and only then: the loop's statistics are of test images)."""
    out, cache = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("cache")
    seen, fitting = {"statistics": [], "fit": []}, []
    statistics, fit = DiffusionDetector.statistics, DiffusionDetector.fit
    fit_all = diffusion_fitting.fit_diffusion_detectors

    def recording_statistics(self, images, ids):
        out = statistics(self, images, ids)
        if fitting:
            seen["statistics"].append((self.name, list(ids), out))
        return out

    def recording_fit(self, stats):
        if fitting:
            seen["fit"].append((self.name, stats))
        return fit(self, stats)

    def recording_fit_all(*args, **kwargs):
        fitting.append(True)
        try:
            return fit_all(*args, **kwargs)
        finally:
            fitting.clear()

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFGUARD_CACHE", str(cache))
        patch.setattr(DiffusionDetector, "statistics", recording_statistics)
        patch.setattr(DiffusionDetector, "fit", recording_fit)
        patch.setattr(diffusion_fitting, "fit_diffusion_detectors", recording_fit_all)
        results = evaluate(load(out, small_models), benchmark)
    return SimpleNamespace(out=out, cache=cache, seen=seen, results=results)


def images_by_id(benchmark) -> dict:
    return {i: image for s in evaluation_sets(benchmark, LIMIT) for i, image in zip(s.ids, s.images)}


# ------------------------------------------------------------------------------------ 1. the columns themselves

def test_each_column_equals_a_direct_computation(reference, small_models, benchmark):
    rows = read_scores(reference.out)
    assert len(rows) == 8 * LIMIT and {*NAMES, *PARTNERS} <= set(next(iter(rows.values())))
    ids = list(rows)
    images = torch.stack([images_by_id(benchmark)[i] for i in ids])
    diffusion = load_diffusion(small_models / "diffusion")
    cfg = load(reference.out, small_models)
    train = subset_by_id(benchmark.train, TRAIN_SAMPLES, cfg.data.seed)
    assert len(train) == TRAIN_SAMPLES
    detectors = {name: DiffusionDetector(name, PARAMS[name], diffusion, seed=cfg.diffguard.seed)
                 for name in (LMD, DIFFPATH, DIFFPATH_1D, MSMA)}
    diffusion.unet.double()  # trainer.precision=64-true: statistics in float64, the training images' too
    for detector in detectors.values():
        if detector.fit_on == registry.FIT_TRAIN:  # in one batch
            detector.fit(detector.statistics(train.images.double(), train.ids))
    for name, detector in detectors.items():
        want = detector.score(detector.statistics(images.double(), ids))
        got = torch.tensor([float(rows[i][name]) for i in ids], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=name)
    # DDPM-OOD: each level's errors z-scored on the InD validation records (mean, sample std), averaged over levels
    _, records, _ = read_records([reference.out])
    errors = {i: r[col.stats_column(DDPM_OOD, "mse")] for i, r in records.items()}
    levels = len(registry.ddpm_ood_levels(registry.diffusion_params(DDPM_OOD, PARAMS[DDPM_OOD])))
    assert levels == 2 and all(len(e) == levels for e in errors.values())
    val = [errors[i] for i, r in records.items() if r[col.SET] == "ind" and r[col.SPLIT] == "val"]
    assert len(val) == LIMIT
    mean = [sum(e[k] for e in val) / len(val) for k in range(levels)]
    std = [(sum((e[k] - mean[k]) ** 2 for e in val) / (len(val) - 1)) ** 0.5 for k in range(levels)]
    for i in ids:
        want = sum((errors[i][k] - mean[k]) / std[k] for k in range(levels)) / levels
        assert float(rows[i][DDPM_OOD]) == pytest.approx(want, rel=1e-9, abs=1e-12), i
    # the fusion without DiffGuard: both z-scores (on InD validation) summed
    val_rows = [r for r in rows.values() if r[col.SET] == "ind" and r[col.SPLIT] == "val"]
    norm = {c: torch.tensor([float(r[c]) for r in val_rows], dtype=torch.float64) for c in (DDPM_OOD, "vim")}
    for row in rows.values():
        want = sum((float(row[c]) - v.mean()) / v.std() for c, v in norm.items())
        assert float(row[f"{DDPM_OOD}+vim"]) == pytest.approx(float(want), rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------------------ 3. no leak

def test_only_ind_training_images_reach_a_fit(reference, benchmark):
    seen = reference.seen
    assert {name for name, _ in seen["fit"]} == set(FITTED)  # DDPM-OOD is z-scored in the report, LMD fits nothing
    train, fitted_ids = set(benchmark.train.ids), set()
    for _, ids, _ in seen["statistics"]:
        fitted_ids.update(ids)
    assert len(fitted_ids) == TRAIN_SAMPLES and fitted_ids <= train
    others = set(benchmark.val.ids) | set(benchmark.test.ids)
    for ood in benchmark.ood.values():
        others |= {i for split in (ood.val, ood.test) if split is not None for i in split.ids}
    assert others and not fitted_ids & others
    # each head was fitted on exactly those images' statistics, in the order they were computed
    for name, stats in seen["fit"]:
        key = DIFFPATH if name == DIFFPATH_1D else name  # DiffPath-1D reads DiffPath's path
        parts = [out for n, _, out in seen["statistics"] if n == key]
        assert parts and stats.keys() == parts[0].keys()
        for kind, value in stats.items():
            assert torch.equal(value, torch.cat([p[kind] for p in parts]))
            assert len(value) == TRAIN_SAMPLES


# -------------------------------------------------------------------------------------------- 2. exactness

@pytest.mark.exactness
@pytest.mark.slow  # the default suite changes the batch size in the resumed run (below)
def test_the_batch_size_changes_no_score(reference, tmp_path, small_models, benchmark, monkeypatch):
    monkeypatch.setenv("DIFFGUARD_CACHE", str(tmp_path / "cache"))  # the training statistics too, in batches of 3
    evaluate(load(tmp_path / "run", small_models, "data.eval_batch_size=3"), benchmark)
    small, full = read_scores(tmp_path / "run"), read_scores(reference.out)
    assert len(detector_columns(full)) == len(NAMES) + 3  # diffguard+diffpath, ddpm_ood+vim, diffguard+ddpm_ood+vim
    assert_same_scores(small, full)


@pytest.mark.exactness
def test_an_interrupted_run_in_other_batches_resumes_to_the_same_scores_reading_the_cache(
        reference, tmp_path, small_models, benchmark, monkeypatch, capfd):
    """Batches of 3 (the reference: 8), the training statistics too, written to an empty cache by the interrupted
    run and read back by the resumed one."""
    from diffguard_pl.records.store import read_file

    monkeypatch.setenv("DIFFGUARD_CACHE", str(tmp_path / "cache"))
    original, calls = DiffusionDetectorsInLoop.score, []

    def failing(self, batch, computed):
        calls.append(len(batch["id"]))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch, computed)

    monkeypatch.setattr(DiffusionDetectorsInLoop, "score", failing)
    cfg = load(tmp_path / "run", small_models, "data.eval_batch_size=3")
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="out of memory in test batch 2"):
        evaluate(cfg, benchmark)
    first = capfd.readouterr()
    assert f"statistics of {TRAIN_SAMPLES} InD training images (6 UNet evaluations each" in first.err
    assert len(list((tmp_path / "cache" / "diffusion").glob("*.pt"))) == 2  # DiffPath's path (shared), MSMA's norms
    (records,) = (tmp_path / "run" / "records").glob("*.jsonl")
    assert len(read_file(records)[1]) == 2 * 3  # the two finished batches are on disk
    monkeypatch.setattr(DiffusionDetectorsInLoop, "score", original)
    evaluate(cfg, benchmark)  # the same command resumes
    resumed = capfd.readouterr()
    assert "resuming: 6 of 32 samples already finished" in resumed.out
    assert f"statistics of {TRAIN_SAMPLES} InD training images read from the cache" in resumed.err
    assert "UNet evaluations each" not in resumed.err
    assert_same_scores(read_scores(tmp_path / "run"), read_scores(reference.out))
    again = json.loads((tmp_path / "run" / "results.json").read_text())["diffusion_detectors"]
    want = json.loads((reference.out / "results.json").read_text())["diffusion_detectors"]
    for name in FITTED:  # the same choice, the fits' timings aside; the cross-validated log-likelihood: DiffPath's
        # 50-component mixtures on folds of 108 rows move by 1e-3 when the statistics move by 1e-12 (float64 rounding
        # in batches of 3 or 8), MSMA's do not
        again[name].pop("fit_seconds"), want[name].pop("fit_seconds")
        got, expected = again[name].pop("cv_loglik", None), want[name].pop("cv_loglik", None)
        if expected is None:  # DiffPath-1D's kernel density chooses nothing
            assert got is None
        else:
            assert got == pytest.approx(expected, rel=1e-2 if name == DIFFPATH else 1e-9)
    assert again == want
    evaluate(cfg, benchmark)  # nothing left: the report alone keeps what the fits chose
    assert "diffusion_detectors" in json.loads((tmp_path / "run" / "results.json").read_text())
    assert "diffusion detectors" not in capfd.readouterr().err  # nothing fitted, nothing read


@pytest.mark.exactness
@pytest.mark.subprocess
def test_two_processes_equal_one(reference, tmp_path, small_models):
    """DiffPath (a mixture each rank fits on the cached statistics) and DDPM-OOD (z-scored on the InD validation
    records both ranks wrote), and their fusions, as in the one-process reference."""
    out, names = tmp_path / "two", [DDPM_OOD, DIFFPATH]
    env = {**os.environ, "DIFFGUARD_CACHE": str(reference.cache), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"),
                             *argv(out, small_models, "trainer.devices=2", "trainer.strategy=ddp", names=names)],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "records").glob("*.jsonl"))) == 2  # one per rank
    two = read_scores(out)
    assert set(detector_columns(two)) == {*names, *(col.fused_column(p) for p in PARTNERS[1:]), PARTNERS[2]}
    assert_same_scores(two, read_scores(reference.out), common=True)


# --------------------------------------------------------------------------------------- 6. what is reported

def test_results_columns_and_scores_describe_the_diffusion_detectors(reference, small_models):
    results = json.loads((reference.out / "results.json").read_text())
    described = results["diffusion_detectors"]
    assert set(described) == set(NAMES)
    diffusion = load_diffusion(small_models / "diffusion")
    for name in NAMES:
        entry = described[name]
        assert entry["params"] == registry.diffusion_params(name, PARAMS[name])
        assert entry["unet_evals_per_image"] == DiffusionDetector(name, PARAMS[name], diffusion).unet_evals_per_image()
    assert described[DDPM_OOD]["unet_evals_per_image"] == 2 + 4  # levels 2 and 4 of a 4-step ladder
    assert described[LMD]["unet_evals_per_image"] == 2 * 3
    assert described[DDPM_OOD]["fitted_on"] == registry.FIT_VAL and described[LMD]["fitted_on"] == registry.FIT_NONE
    for name in FITTED:
        assert described[name]["fitted_on"] == f"{TRAIN_SAMPLES} InD training images"
    mixture = described[DIFFPATH]["mixture"]
    assert mixture["n_components"] in (50, 100) and mixture["covariance_type"] in ("full", "tied", "diag", "spherical")
    assert isinstance(described[DIFFPATH]["cv_loglik"], float)
    assert described[MSMA]["mixture"]["n_components"] in range(2, 21, 2)
    assert set(described[MSMA]["cv_loglik"]) == {str(k) for k in range(2, 21, 2)}
    assert described[DIFFPATH_1D]["bandwidth"] == 5.0
    # every detector's metrics, and the fusions with them
    assert {*NAMES, *(col.fused_column(p) for p in PARTNERS), f"{DDPM_OOD}+vim"} <= set(results["detectors"])
    # scores.csv: a column per detector, none of the per-sample statistics (they stay in records/)
    rows = read_scores(reference.out)
    header = list(next(iter(rows.values())))
    assert not [c for c in header if c.startswith(col.STATS_PREFIX)]
    _, records, _ = read_records([reference.out])
    kept = {c for r in records.values() for c in r if col.stats_of(c)}
    assert {col.stats_of(c)[0] for c in kept} == set(NAMES)
    # columns.json describes each of them: meaning, unit, sign
    dictionary = json.loads((reference.out / "columns.json").read_text())["columns"]
    assert list(dictionary) == header
    for column in detector_columns(rows):
        entry = dictionary[column]
        assert entry["meaning"] and entry["direction"] == "higher = more OOD", column
    for name in NAMES:
        assert registry.diffusion_detector(name).meaning in dictionary[name]["meaning"]
        assert dictionary[name]["unit"] == registry.diffusion_detector(name).unit



# ------------------------------------------------------------------------------------------ 4. config errors

@pytest.mark.parametrize("names, params, partners, message", [
    (["ddpm_od"], {}, ["vim"], "diffusion_detectors.names has 'ddpm_od', which is no diffusion detector: choose from "
                               + ", ".join(NAMES)),
    ([LMD], {LMD: {"repetitionz": 2}}, ["vim"], f"diffusion_detectors.params.{LMD}: {LMD} has no parameter "
                                                "'repetitionz': its parameters are repetitions, num_steps"),
    ([LMD], {"msme": {"levels": 3}}, ["vim"], "diffusion_detectors.params has 'msme', which is no diffusion "
                                              "detector"),
    ([LMD], {}, [MSMA], f"fusion_partners has '{MSMA}', but diffusion_detectors.names does not run {MSMA}"),
    ([LMD], {}, [f"{LMD}+{MSMA}"], f"fusion_partners has '{LMD}+{MSMA}', but diffusion_detectors.names does not run "
                                   f"{MSMA}"),
    ([LMD], {}, [f"{LMD}+bogus"], "fusion_partners has 'bogus', which is no classifier detector"),
    ([DDPM_OOD], {DDPM_OOD: {"features": "bogus"}}, ["vim"],
     f"diffusion_detectors.params.{DDPM_OOD}.features='bogus' is not allowed; choose one of ['none', 'classifier']"),
    ([LMD], {LMD: {"distance": "lpips"}}, ["vim"],
     f"diffusion_detectors.params.{LMD}.distance='lpips' is not allowed; choose one of ['mse', 'features']"),
])
def test_a_bad_config_is_refused_naming_the_key(tmp_path, small_models, names, params, partners, message):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, small_models, names=names, params=params, partners=partners)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name, params, message", [
    (DDPM_OOD, {"num_steps": 1, "skip": 2}, f"diffusion_detectors.params.{DDPM_OOD}: num_steps=1 with skip=2 gives no start "
                                 "level"),
    (DIFFPATH_1D, {"num_steps": 1}, f"diffusion_detectors.params.{DIFFPATH_1D}: num_steps=1: DiffPath needs at least 2 "
                                    "steps"),
    (LMD, {"blocks": 1}, f"diffusion_detectors.params.{LMD}: square=16 must lie in [1, 15] for 16-pixel images"),
    (MSMA, {"levels": 5000}, f"diffusion_detectors.params.{MSMA}: 5000 geometric sigmas map to only"),
])
def test_params_the_model_cannot_run_with_are_refused_before_any_work(tmp_path, small_models, benchmark, name,
                                                                     params, message):
    cfg = load(tmp_path / "run", small_models, names=[name], params={name: params}, partners=["vim"])
    with pytest.raises(ConfigError) as caught:
        evaluate(cfg, benchmark)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # before the output folder, the classifier detectors and the loop


# ---------------------------------------------------------------------------------------- 5. the statistics cache

def test_a_damaged_cache_entry_is_computed_again_with_a_warning(tmp_path, small_models, benchmark, monkeypatch,
                                                                 capsys):
    from diffguard_pl.detectors.diffusion_fitting import build_diffusion_detectors, fit_diffusion_detectors

    monkeypatch.setenv("DIFFGUARD_CACHE", str(tmp_path / "cache"))
    cfg = load(tmp_path / "run", small_models, names=[DIFFPATH_1D], params={DIFFPATH_1D: PARAMS[DIFFPATH_1D]},
               partners=["vim"], train=30)
    diffusion = load_diffusion(small_models / "diffusion")
    probe, probe_ids = benchmark.val.images[:5], benchmark.val.ids[:5]

    def fitted():
        (detector,) = build_diffusion_detectors(cfg, diffusion)
        fit_diffusion_detectors([detector], benchmark, cfg)
        return detector.score(detector.statistics(probe, probe_ids))

    first = fitted()
    (entry,) = (tmp_path / "cache" / "diffusion").glob("*.pt")
    capsys.readouterr()
    assert torch.equal(fitted(), first)
    assert "statistics of 30 InD training images read from the cache" in capsys.readouterr().err
    entry.write_bytes(entry.read_bytes()[:200])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match=rf"cached diffusion statistics {re.escape(str(entry))} cannot be read "
                                         r"\(.*\); computing them again"):
        again = fitted()
    assert "read from the cache" not in capsys.readouterr().err
    assert torch.equal(again, first)
    assert torch.load(entry, weights_only=True).keys() == {"path"}  # written again, whole
