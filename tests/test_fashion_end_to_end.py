"""Fashion-OOD end to end: the committed models on the real data, through evaluate.py's code path, on a few images."""

import csv
import json

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import DataConfig, EvalConfig
from diffguard_pl.errors import ConfigError
from diffguard_pl.data import build_benchmark, fashion
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.models import load_classifier

from helpers.paths import ROOT

FASHION = ROOT / "checkpoints" / "fashion"
OOD_SETS = {"fashion_6to9", "mnist", "animals", "textures", "faces", "photos", "noise", "constant"}

pytestmark = pytest.mark.skipif(
    not (fashion.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not in {fashion.DEBIAN_DIR} (make setup installs dataset-fashion-mnist as root)")


@pytest.fixture(scope="module")
def bench():
    return build_benchmark(DataConfig(benchmark="fashion", resolution=16))


def test_committed_models_fit_the_budget_and_the_classifier_the_accuracy_band(bench):
    size = sum(f.stat().st_size for f in FASHION.rglob("*") if f.is_file())
    assert size <= 40e6, f"checkpoints/fashion holds {size / 1e6:.1f} MB"
    classifier = load_classifier(FASHION / "classifier").eval()
    with torch.no_grad():
        pred = torch.cat([classifier(bench.test.images[i:i + 1000]).argmax(1) for i in range(0, 6000, 1000)])
    accuracy = float((pred == bench.test.labels).double().mean())
    assert 0.90 <= accuracy <= 0.96, accuracy  # issue 16's band: not saturated, not weakened


# The classifier-free path end to end runs in the default suite on digits (test_classifier_free.py); here it is slow.
@pytest.mark.parametrize("preset", ["fashion_gdm.yaml",
                                    pytest.param("fashion_classifier_free.yaml", marks=pytest.mark.slow)])
def test_preset_runs_end_to_end(tmp_path, bench, preset):
    argv = [f"--config={ROOT / 'conf' / preset}", f"output_dir={tmp_path}", "limit_per_set=3",
            "diffguard.num_steps=10", "diffguard.depth=4", "baselines.train_samples=600",
            "trainer.enable_progress_bar=false", "callbacks.reconstructions=2"]
    cfg = config_lib.load(EvalConfig, argv, None)
    results = evaluate(cfg, bench)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["num_samples"]) == {"ind"} | OOD_SETS and set(saved["num_samples"].values()) == {3}
    entry = saved["detectors"]["diffguard"]
    assert set(entry["per_ood"]) == OOD_SETS
    with open(tmp_path / "scores.csv") as handle:  # the reported AUROC is the one of the written scores
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    score = {s: torch.tensor([float(r["diffguard"]) for r in rows if r["set"] == s]) for s in {"ind"} | OOD_SETS}
    assert (score["ind"] > 0).all()  # the committed models' synthesis differs from every input
    for name in OOD_SETS:
        assert entry["per_ood"][name]["auroc"] == pytest.approx(auroc(score["ind"], score[name]), abs=1e-12)
    assert saved["groups"]["fashion_6to9"] == "near" and saved["groups"]["mnist"] == "far"
    assert saved["classifier_check"]["problem"] is None and saved["classifier_check"]["validation_images"] == 5400
    assert set(saved["synthesis_follows_label"]) == {"ind"} | OOD_SETS
    assert results["throughput"]["unet_evals_per_image"] >= 4
    assert (tmp_path / "reconstructions" / "mnist.png").is_file()


def test_the_digits_classifier_is_refused_on_fashion_before_any_work(tmp_path, bench):
    """Issue 32: the Digits-OOD classifier takes Fashion-OOD's images (16x16x1, 6 classes) and once ran a whole
    evaluation at chance; the classifier check (a dry run too) refuses it, naming both accuracies and the flag."""
    argv = [f"--config={ROOT / 'conf' / 'fashion_gdm.yaml'}", f"output_dir={tmp_path / 'out'}", "dry_run=true",
            f"models.classifier={ROOT / 'checkpoints' / 'digits' / 'classifier'}"]
    with pytest.raises(ConfigError) as info:
        evaluate(config_lib.load(EvalConfig, argv, None), bench)
    message = str(info.value)
    assert "does not fit benchmark fashion" in message and "are not the benchmark's (T-shirt/top" in message
    assert "InD validation accuracy on 5,400 images is near chance" in message
    assert "below the 100.0% recorded at training" in message and "It was trained on digits" in message
    assert f"{FASHION / 'classifier'}" in message and "models.allow_classifier_mismatch=true" in message
    assert not (tmp_path / "out").exists()
