"""The classifier detectors of an evaluation, fitted on InD training images and tuned on validation splits.

The features they read come from the on-disk cache (diffguard_pl/detectors/features.py); the detectors fitted and
tuned are cached beside them (diffguard_pl/detectors/detector_cache.py), so a second start fits none of them.
"""

from __future__ import annotations

import sys

import torch

from diffguard_pl.config import EvalConfig
from diffguard_pl.console import Phase, is_rank_zero
from diffguard_pl.data import Benchmark
from diffguard_pl.data.selection import subset_by_id
from diffguard_pl.detectors import detector_cache
from diffguard_pl.detectors.classifier_parts import ClassifierParts, Samples
from diffguard_pl.detectors.features import classifier_digest, classifier_outputs, set_digest
from diffguard_pl.detectors.tuning import ClassifierDetectors, fit_detectors, label
from diffguard_pl.errors import ConfigError
from diffguard_pl.models import Classifier


def fit_classifier_detectors(classifier: Classifier, benchmark: Benchmark,
                             cfg: EvalConfig) -> tuple[ClassifierDetectors, dict]:
    """The classifier detectors of ``baselines.detectors`` fitted on the InD training split (``baselines.train_samples``
    of it, chosen by id hash), their hyperparameters chosen on validation splits (diffguard_pl/detectors/tuning.py).

    The choice uses the InD validation split against the pooled ``val`` splits of every OOD set (all their
    samples: ``limit_per_set`` does not apply, so the choice depends only on the fingerprinted config). Test
    splits are never used. Read from the detector cache when the same classifier, samples, settings and code
    fitted them before (one line says where from); otherwise fitted, printing each detector's choice and cost and
    why any was left out, and cached. Returns the fitted detectors and the choice (results.json's ``baselines``;
    each record's ``cached`` says whether it was read from the cache, its timings then those of the fit that
    wrote it).
    """
    image_sets = _image_sets(benchmark, cfg)
    parts = ClassifierParts(classifier)
    classifier_key = classifier_digest(classifier)
    data = {key: None if s is None or not len(s) else {"set": set_digest(s), "labels": detector_cache.labels_digest(
        s.labels)} for key, (s, _) in image_sets.items()}
    path = detector_cache.entry_path(classifier_key, data, cfg.baselines, cfg.data.eval_batch_size, parts.device)
    restored = detector_cache.read(path, parts)
    if restored is not None and is_rank_zero():
        print(f"classifier detectors: {len(restored.fitted)} read from the cache {path}", file=sys.stderr, flush=True)
    if restored is not None and not restored.refit:
        return ClassifierDetectors(parts, restored.fitted), restored.choice

    samples = {}
    for key, (image_set, what) in image_sets.items():
        logits, feats = classifier_outputs(classifier, image_set, cfg.data.eval_batch_size, cfg.data.num_workers,
                                           what, classifier_key=classifier_key,
                                           set_key=data[key]["set"] if data[key] else None)
        labels = image_set.labels if image_set is not None else torch.zeros(0, dtype=torch.long)
        samples[key] = Samples(logits, feats, labels, image_set, cfg.data.eval_batch_size)
    names = list(cfg.baselines.detectors) if restored is None else restored.refit
    which = "classifier detectors" if restored is None else "classifier detectors whose state the cache does not keep"
    with Phase(f"fitting {len(names)} {which} on {len(samples['train']):,} InD training images (hyperparameters "
               f"chosen on validation splits)", len(names), unit="detectors") as phase:
        classifier_detectors, choice = _fit(names, parts, samples, cfg, lambda _: phase.advance(1))
        if restored is None:
            phase.note = detector_cache.write(path, classifier_detectors, choice)
    if restored is not None:
        return _merge(restored, classifier_detectors, choice, parts)
    if is_rank_zero():
        print(describe_choice(choice))
    return classifier_detectors, choice


def _image_sets(benchmark: Benchmark, cfg: EvalConfig) -> dict:
    """The sets the detectors are fitted and tuned on, each with its name on the console: ``train`` (``baselines.
    train_samples`` of the InD training split, chosen by id hash), ``ind`` (the InD validation split) and ``ood``
    (the OOD validation splits pooled as one set; None without any)."""
    train = subset_by_id(benchmark.train, cfg.baselines.train_samples, cfg.data.seed)
    pooled = None
    ood_val = [s.val for s in benchmark.ood.values() if s.val is not None and len(s.val)]
    if ood_val:  # one set: one cache entry, one line on the console
        pooled = type(ood_val[0]).pooled("ood_val", ood_val, "val")
    return {"train": (train, "InD training images"), "ind": (benchmark.val, "InD validation images"),
            "ood": (pooled, "OOD validation images")}


def _fit(names, parts: ClassifierParts, samples: dict, cfg: EvalConfig,
         progress) -> tuple[ClassifierDetectors, dict]:
    """tuning.fit_detectors on the evaluation's samples, a config it cannot follow raised as a ConfigError; each
    record marked ``cached: false``."""
    b = cfg.baselines
    try:
        classifier_detectors, choice = fit_detectors(names, parts, samples["train"], samples["ind"], samples["ood"],
                                                     b.params, b.grids, progress=progress)
    except ValueError as error:
        if str(error).startswith("baselines."):
            raise ConfigError(str(error)) from error
        raise
    for name in classifier_detectors.names:
        choice[name]["cached"] = False
    return classifier_detectors, choice


def _merge(restored: detector_cache.Restored, classifier_detectors: ClassifierDetectors, choice: dict,
           parts: ClassifierParts) -> tuple[ClassifierDetectors, dict]:
    """The detectors read from the cache and those fitted again (``classifier_detectors``, ``choice``), in the
    cached choice's order."""
    merged = {name: restored.fitted.get(name) or classifier_detectors.fitted.get(name) for name in restored.choice}
    merged = {name: f for name, f in merged.items() if f is not None}
    merged_choice = {name: restored.choice[name] if name in restored.fitted else choice[name] for name in merged}
    merged_choice["left_out"] = {**restored.choice["left_out"], **choice["left_out"]}
    merged_choice["validation"] = restored.choice["validation"]
    return ClassifierDetectors(parts, merged), merged_choice


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
