"""The classifier detectors of an evaluation, fitted on InD training images and tuned on validation splits.

The features they read come from the on-disk cache (diffguard_pl/detectors/features.py).
"""

from __future__ import annotations

import torch

from diffguard_pl.config import EvalConfig
from diffguard_pl.console import Phase, is_rank_zero
from diffguard_pl.data import Benchmark
from diffguard_pl.data.selection import subset_by_id
from diffguard_pl.detectors.classifier_parts import ClassifierParts, Samples
from diffguard_pl.detectors.features import classifier_outputs
from diffguard_pl.detectors.tuning import ClassifierDetectors, fit_detectors, label
from diffguard_pl.errors import ConfigError
from diffguard_pl.models import Classifier


def fit_classifier_baselines(classifier: Classifier, benchmark: Benchmark,
                             cfg: EvalConfig) -> tuple[ClassifierDetectors, dict]:
    """The classifier detectors of ``baselines.detectors`` fitted on the InD training split (``baselines.train_samples``
    of it, chosen by id hash), their hyperparameters chosen on validation splits (diffguard_pl/detectors/tuning.py).

    The choice uses the InD validation split against the pooled ``val`` splits of every OOD set (all their
    samples: ``limit_per_set`` does not apply, so the choice depends only on the fingerprinted config). Test
    splits are never used. Prints each detector's choice and cost, and why any was left out. Returns the fitted
    detectors and the choice (results.json's ``baselines``).
    """
    batch, workers = cfg.data.eval_batch_size, cfg.data.num_workers
    train = subset_by_id(benchmark.train, cfg.baselines.train_samples, cfg.data.seed)
    pooled = None
    ood_val = [s.val for s in benchmark.ood.values() if s.val is not None and len(s.val)]
    if ood_val:  # the OOD validation splits as one set (one cache entry, one line on the console)
        pooled = type(ood_val[0]).pooled("ood_val", ood_val, "val")
    sets = {}
    for key, image_set, what in (("train", train, "InD training images"),
                                 ("ind", benchmark.val, "InD validation images"),
                                 ("ood", pooled, "OOD validation images")):
        logits, feats = classifier_outputs(classifier, image_set, batch, workers, what)
        labels = image_set.labels if image_set is not None else torch.zeros(0, dtype=torch.long)
        sets[key] = Samples(logits, feats, labels, image_set, batch)
    names, b = list(cfg.baselines.detectors), cfg.baselines
    with Phase(f"fitting {len(names)} classifier detectors on {len(train):,} InD training images (hyperparameters "
               f"chosen on validation splits)", len(names), unit="detectors") as phase:
        try:
            detectors, choice = fit_detectors(names, ClassifierParts(classifier), sets["train"], sets["ind"],
                                              sets["ood"], b.params, b.grids, progress=lambda _: phase.advance(1))
        except ValueError as error:
            if str(error).startswith("baselines."):
                raise ConfigError(str(error)) from error
            raise
    if is_rank_zero():
        print(describe_choice(choice))
    return detectors, choice


def describe_choice(choice: dict) -> str:
    """One line per classifier detector: its hyperparameters, validation AUROC, seconds to fit and tune, ms per
    image; one line per detector left out, with its reason."""
    lines = [f"{'detector':<10} {'hyperparameters':<44} {'val AUROC':>9} {'fit+tune':>9} {'ms/image':>9}"]
    for name, record in choice.items():
        if name in ("left_out", "validation"):
            continue
        params = label(record["params"]) if record["params"] else "-"
        value = record["val_auroc"].get(label(record["params"]))
        ms = record["ms_per_image"]
        lines.append(f"{name:<10} {params:<44} {'-' if value is None else f'{value:.4f}':>9} "
                     f"{record['seconds']:>8.1f}s {'-' if ms is None else f'{ms:.4f}':>9}")
    lines += [f"{name:<10} left out: {reason}" for name, reason in choice["left_out"].items()]
    return "\n".join(lines)
