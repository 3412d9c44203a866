"""Exact multi-process evaluation and interruption-safe results (CPU, gloo), through the real CLI."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.configs import eval_argv
from helpers.paths import ROOT

pytestmark = pytest.mark.subprocess  # every test here runs evaluate.py in subprocesses

# AES and cutout on, so that per-sample seeding and per-sample stopping are exercised, with the released recipe
# (its ladder, x0 clipping in both directions, whole-pixel cutouts). float64, so that what is compared is the
# per-sample logic rather than rounding that depends on batch composition.
EXTRA = ["trainer.precision=64-true", "diffguard.num_steps=6", "diffguard.depth=4", "diffguard.guidance.cutout.num=2",
         "diffguard.ladder=released", "diffguard.clip_x0=both", "diffguard.guidance.cutout.mode=released",
         "diffguard.aes.enabled=true", "diffguard.aes.psnr=23", "diffguard.reference=unguided",
         "data.eval_batch_size=4", "callbacks.reconstructions=0"]


def run_eval(out, models, *extra, check=True):
    argv = eval_argv(out, models, *EXTRA, *extra)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *argv], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_scores(out):
    with open(out / "scores.csv") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def assert_same_scores(a, b, rtol=1e-9):
    assert a.keys() == b.keys()
    for sample_id, row in a.items():
        other = b[sample_id]
        for column, value in row.items():
            if column in ("id", "set", "split"):
                assert value == other[column]
            else:
                assert float(value) == pytest.approx(float(other[column]), rel=rtol, abs=1e-12), (sample_id, column)


def metrics(out):
    results = json.loads((out / "results.json").read_text())
    results.pop("throughput")
    for choice in results["baselines"].values():  # the fitting times: measured (or read from the detector cache)
        if isinstance(choice, dict):
            choice.pop("seconds", None), choice.pop("ms_per_image", None), choice.pop("cached", None)
    # a mean of per-sample PSNRs, each computed in a batch of another size: equal to float64 rounding (as scores.csv)
    results["round_trip_psnr"] = {s: round(v, 9) for s, v in results.get("round_trip_psnr", {}).items()}
    return results


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_models):
    """One uninterrupted single-process run: the reference the other runs must equal."""
    out = tmp_path_factory.mktemp("full")
    run_eval(out, small_models)
    return out


@pytest.mark.exactness
def test_two_processes_equal_one(tmp_path, small_models, full_run):
    run_eval(tmp_path / "two", small_models, "trainer.devices=2", "trainer.strategy=ddp")
    one, two = read_scores(full_run), read_scores(tmp_path / "two")
    assert len(one) == 48  # InD val, InD test and six OOD sets, 6 samples each: none dropped or doubled
    assert_same_scores(one, two)
    assert len({row["depth"] for row in one.values()}) > 1  # AES stopped samples at different depths
    m1, m2 = metrics(full_run), metrics(tmp_path / "two")
    assert m1["num_samples"] == m2["num_samples"] and m1["id_accuracy"] == m2["id_accuracy"]
    for name, entry in m1["detectors"].items():
        for set_name, values in entry["per_ood"].items():
            for key, value in values.items():
                assert value == pytest.approx(m2["detectors"][name]["per_ood"][set_name][key], abs=1e-9)
    shard_files = list((tmp_path / "two" / "records").glob("*.jsonl"))
    assert len(shard_files) == 2  # one per rank


@pytest.mark.exactness
@pytest.mark.slow
def test_a_rank_with_no_samples(tmp_path, small_models):
    # shard 0/48 of 48 samples is a single sample: the second process gets none.
    run_eval(tmp_path / "tiny", small_models, "shard=0/48", "trainer.devices=2", "trainer.strategy=ddp")
    assert len(read_scores(tmp_path / "tiny")) == 1


@pytest.mark.exactness
@pytest.mark.slow  # the default suite resumes after SIGTERM (below), torn last line included
def test_killed_run_resumes_to_identical_results(tmp_path, small_models, full_run):
    out = tmp_path / "killed"
    argv = eval_argv(out, small_models, *EXTRA, "data.eval_batch_size=2")
    process = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *argv], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        files = list((out / "records").glob("*.jsonl")) if (out / "records").exists() else []
        lines = sum(len(p.read_text().splitlines()) for p in files)
        if lines >= 11:  # the header and at least five batches
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "results.json").exists()
    (shard,) = (out / "records").glob("*.jsonl")
    with open(shard, "a") as handle:
        handle.write('{"id": "torn-wri')  # a write cut short by the crash
    resumed = run_eval(out, small_models, "data.eval_batch_size=2")
    assert "resuming" in resumed.stdout and "torn" in resumed.stdout
    scores = read_scores(out)
    with open(out / "scores.csv") as handle:
        ids = [row["id"] for row in csv.DictReader(handle)]
    assert len(ids) == len(set(ids)) == 48
    assert_same_scores(scores, read_scores(full_run))
    assert metrics(out) == metrics(full_run)


def test_resume_and_merge_refuse_another_config_naming_the_keys(tmp_path, small_models, full_run):
    out = tmp_path / "run"
    run_eval(out, small_models, "shard=0/8", "diffguard.aes.psnr=24")
    changed = run_eval(out, small_models, "shard=0/8", check=False)  # the full run's psnr, 23
    # one error line; before it, the classifier check's lines (a random classifier, allowed by eval_argv)
    lines = [line for line in changed.stderr.splitlines() if line.strip() and not line.startswith(
        ("classifier features of InD validation images", "warning: the classifier"))]
    assert changed.returncode == 2 and len(lines) == 1 and "another config" in lines[0]
    assert "diffguard.aes.psnr: 24.0 then, 23.0 now" in lines[0]
    merged = subprocess.run([sys.executable, "-m", "diffguard_pl.jobs.merge", str(out), str(full_run),
                             "--output", str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT)
    line = next(line for line in merged.stderr.splitlines() if line.startswith("error:"))
    assert merged.returncode == 2 and "another config" in line and "diffguard.aes.psnr: 23.0 then, 24.0 now" in line
    assert not (tmp_path / "merged").exists()


@pytest.mark.exactness
def test_shards_split_by_hand_merge_to_the_full_result(tmp_path, small_models, full_run):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        run_eval(part, small_models, f"shard={i}/2")
    merged = subprocess.run([sys.executable, "-m", "diffguard_pl.jobs.merge", *map(str, parts),
                             "--output", str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr
    assert_same_scores(read_scores(tmp_path / "merged"), read_scores(full_run))
    assert metrics(tmp_path / "merged") == metrics(full_run)


@pytest.mark.exactness
def test_sigterm_stops_promptly_keeps_finished_samples_and_resumes(tmp_path, small_models, full_run):
    """What SLURM or Kubernetes send before killing a job: the run stops after the current model call, says
    that the same command resumes, exits with 143, and the resumed run equals an uninterrupted one."""
    out = tmp_path / "terminated"
    argv = eval_argv(out, small_models, *EXTRA, "data.eval_batch_size=2")
    process = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *argv], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        files = list((out / "records").glob("*.jsonl")) if (out / "records").exists() else []
        if sum(len(p.read_text().splitlines()) for p in files) >= 7:  # the header and at least three batches
            break
        time.sleep(0.2)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    took = time.time() - sent
    assert process.returncode == 143, stderr[-2000:]
    # A batch of two tiny samples is well under a second of work: stopping waits for one model call, not the run.
    assert took < 15, took
    assert "SIGTERM" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr and not (out / "results.json").exists()
    (records,) = (out / "records").glob("*.jsonl")
    with open(records, "a") as handle:
        handle.write('{"id": "torn-wri')  # and a write cut short, as a SIGKILL would leave it
    resumed = run_eval(out, small_models, "data.eval_batch_size=2")
    assert "resuming" in resumed.stdout and "torn" in resumed.stdout
    assert_same_scores(read_scores(out), read_scores(full_run))
