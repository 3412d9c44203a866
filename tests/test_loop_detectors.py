"""The loop detectors (diffguard_pl/detectors/loop.py): one interface, declared columns, and the classifier
detectors the same whether they read DiffGuard's classifier pass or run their own."""

import torch

from diffguard_pl.config import DiffGuardConfig, GuidanceConfig
from diffguard_pl.detectors.classifier_parts import ClassifierParts, Samples
from diffguard_pl.detectors.loop import ClassifierDetectorsInLoop, DiffGuardInLoop, score_batch
from diffguard_pl.detectors.tuning import fit_detectors
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.records.columns import check_columns, detector_columns

from helpers.paths import CHECKPOINTS


def samples(image_set, classifier, rows):
    images = image_set.images[:rows]
    with torch.no_grad():
        logits, feats = classifier.forward_with_features(images)
    return Samples(logits, feats, image_set.labels[:rows], images, 16)


def batch_of(image_set, rows):
    return {"image": image_set.images[:rows], "id": list(image_set.ids[:rows]), "label": image_set.labels[:rows],
            "set": [image_set.name] * rows, "split": [image_set.split] * rows}


def test_loop_detectors_write_declared_columns_and_classifier_detectors_match_alone(benchmark):
    classifier = load_classifier(CHECKPOINTS / "classifier")
    diffusion = load_diffusion(CHECKPOINTS / "diffusion_uncond")
    ood = benchmark.ood["digits_6to9"].val
    fitted, _ = fit_detectors(["msp", "ebo", "knn"], ClassifierParts(classifier), samples(benchmark.train, classifier, 120),
                              samples(benchmark.val, classifier, 30), samples(ood, classifier, 30))
    cfg = DiffGuardConfig(num_steps=4, depth=2, distances=["l1", "l2"], guidance=GuidanceConfig(scale=3.0))
    diffguard = DiffGuardInLoop(DiffGuardPipeline(diffusion, classifier, cfg), oracle="paper")
    batch = batch_of(benchmark.test, 5)
    record, computed = score_batch([diffguard, ClassifierDetectorsInLoop(fitted)], batch)
    check_columns(list(record))
    assert set(detector_columns(record)) == {"diffguard/l1", "diffguard/l2", "oracle-paper/diffguard/l1",
                                             "oracle-paper/diffguard/l2", "msp", "ebo", "knn"}
    assert all(len(values) == 5 for values in record.values())
    assert min(record["unet_evals"]) >= diffguard.unet_evals_per_image() > 0 and "logits" in computed
    alone, _ = score_batch([ClassifierDetectorsInLoop(fitted, classifier)], batch)  # a classifier pass of its own
    for name in ("msp", "ebo", "knn"):
        torch.testing.assert_close(torch.tensor(alone[name]), torch.tensor(record[name]), rtol=1e-5, atol=1e-6)
