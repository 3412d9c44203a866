"""Does the classifier belong to the benchmark? Its accuracy on InD validation images, checked before any work.

A classifier of another benchmark with the same input shape and class count (the Digits-OOD classifier on
Fashion-OOD, or the right classes in another order) passes every shape check and makes every score meaningless:
DiffGuard guides towards wrong labels and the classifier detectors read wrong logits. The evaluation measures
the classifier's accuracy on the benchmark's InD validation split (all of it: the classifier detectors need the
same logits, read from the features cache, diffguard_pl/detectors/features.py) and refuses to run when
:func:`check_classifier_fits` finds a problem, unless ``models.allow_classifier_mismatch=true``.

train.py records what a classifier was trained on (:func:`training_record`, ``classifier.json``'s
``trained_on`` and ``class_names``), measured by the same function on the same split, so the two numbers compare.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from diffguard_pl.console import is_rank_zero
from diffguard_pl.detectors.features import classifier_outputs
from diffguard_pl.errors import ConfigError

# at least this many labelled images: at 100 an accuracy's standard error is at most 5 points, so MARGIN below is
# three of them; with fewer the accuracy rules are not applied (the class names still are)
MIN_IMAGES = 100
MARGIN = 0.15  # refused this far (a fraction) below the accuracy recorded at training


def chance_limit(num_classes: int) -> float:
    """The accuracy below which a classifier is called near chance: twice chance (2 / C), at most halfway
    between chance and 100% (two classes: 75%, not 100%)."""
    chance = 1.0 / num_classes
    return min(2.0 * chance, (1.0 + chance) / 2.0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[Optional[float], int]:
    """(fraction of labelled samples whose argmax is their label, how many are labelled); OOD samples (label
    < 0) are left out; (None, 0) without any labelled one."""
    labels = labels.to(logits.device)
    keep = labels >= 0
    n = int(keep.sum())
    if n == 0:
        return None, 0
    return float((logits[keep].argmax(dim=1) == labels[keep]).double().mean()), n


def validation_accuracy(classifier, image_set, batch_size: int, num_workers: int = 0,
                        cache: bool = True) -> tuple[Optional[float], int]:
    """:func:`accuracy` of the classifier on a set (its logits from the features cache where it has them)."""
    logits, _ = classifier_outputs(classifier, image_set, batch_size, num_workers, "InD validation images", cache)
    return accuracy(logits, image_set.labels)


def training_record(classifier, benchmark, batch_size: int) -> dict:
    """What train.py writes as ``classifier.json``'s ``trained_on``: the benchmark's name and the classifier's
    accuracy on its InD validation split (the number an evaluation compares with)."""
    measured, n = validation_accuracy(classifier, benchmark.val, batch_size, cache=False)
    return {"benchmark": benchmark.name, "validation_accuracy": None if measured is None else round(measured, 6),
            "validation_images": n}


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def check_classifier_fits(measured: Optional[float], images: int, num_classes: int, recorded: Optional[float] = None,
                          class_names_model: Optional[Sequence[str]] = None,
                          class_names_benchmark: Optional[Sequence[str]] = None) -> Optional[str]:
    """Why the classifier does not fit the benchmark (one message, every problem found), or None when it does.

    The rules, each applied when what it needs is known:
    (a) the class names recorded with the classifier differ from the benchmark's (the same names in another
        order included);
    (b) ``measured`` (the InD validation accuracy on ``images`` images) is near chance: below
        :func:`chance_limit` (twice 1 / ``num_classes``, at most halfway to 100%);
    (c) ``measured`` is more than :data:`MARGIN` (15 points) below ``recorded``, the accuracy on the InD
        validation split of the benchmark it was trained on.
    (b) and (c) need at least :data:`MIN_IMAGES` labelled images.
    """
    problems = []
    if class_names_model is not None and class_names_benchmark is not None:
        ours, theirs = list(class_names_model), list(class_names_benchmark)
        if ours != theirs:
            how = "in another order than" if sorted(ours) == sorted(theirs) else "not"
            problems.append(f"its classes ({', '.join(ours)}) are {how} the benchmark's ({', '.join(theirs)})")
    low = []
    if measured is not None and images >= MIN_IMAGES:
        if measured < chance_limit(num_classes):
            low.append(f"near chance ({_percent(1 / num_classes)} for {num_classes} classes; refused below "
                       f"{_percent(chance_limit(num_classes))})")
        if recorded is not None and measured < recorded - MARGIN:
            low.append(f"{100 * (recorded - measured):.1f} points below the {_percent(recorded)} recorded at "
                       f"training (refused beyond {100 * MARGIN:.0f} points)")
    if low:
        problems.append(f"its {_percent(measured)} InD validation accuracy on {images:,} images is {' and '.join(low)}")
    return "; ".join(problems) or None


def check_classifier(cfg, classifier, benchmark) -> dict:
    """Stage 3 of an evaluation: the classifier's InD validation accuracy on one console line, then
    :func:`check_classifier_fits`; ConfigError naming the classifier, the numbers, the likely cause and the fix,
    or (with ``models.allow_classifier_mismatch``) a warning. Returns results.json's ``classifier_check``."""
    spec, path = classifier.spec, cfg.models.classifier
    trained_on = spec.trained_on or {}
    recorded = trained_on.get("validation_accuracy")
    measured, n = validation_accuracy(classifier, benchmark.val, cfg.data.eval_batch_size, cfg.data.num_workers)
    problem = check_classifier_fits(measured, n, spec.num_classes, recorded, spec.class_names, benchmark.class_names)
    at_training = (f"recorded at training on {trained_on.get('benchmark')}: {_percent(recorded)}"
                   if recorded is not None else "nothing recorded at training")
    line = (f"classifier: {_percent(measured)} InD validation accuracy on {n:,} images ({at_training})"
            if measured is not None else "classifier: no labelled InD validation image to check its accuracy on")
    if measured is not None and n < MIN_IMAGES:
        line += f"; too few images (under {MIN_IMAGES}) to judge it by"
    if is_rank_zero():
        print(line, flush=True)
    record = {"validation_accuracy": measured, "validation_images": n, "recorded_accuracy": recorded,
              "recorded_benchmark": trained_on.get("benchmark"), "problem": problem,
              "allowed": bool(problem) and cfg.models.allow_classifier_mismatch}
    if problem is None:
        return record
    if cfg.models.allow_classifier_mismatch:
        if is_rank_zero():
            print(f"warning: the classifier {path} does not fit benchmark {benchmark.name} ({problem}); evaluating "
                  f"it anyway (models.allow_classifier_mismatch=true): its scores mean little", file=sys.stderr,
                  flush=True)
        return record
    raise ConfigError(
        f"the classifier {path} (models.classifier) does not fit benchmark {benchmark.name}: {problem}. "
        f"{_likely_cause(trained_on.get('benchmark'), benchmark.name, spec.class_names, benchmark.class_names)}. "
        f"Set models.classifier to a classifier trained on {benchmark.name}{_committed(benchmark.name)}, or "
        f"models.allow_classifier_mismatch=true to evaluate this one anyway")


def _likely_cause(trained: Optional[str], benchmark: str, ours: Optional[Sequence[str]],
                  theirs: Optional[Sequence[str]]) -> str:
    if trained and trained != benchmark:
        return f"It was trained on {trained} (its classifier.json says so)"
    if ours is not None and theirs is not None and list(ours) != list(theirs) and sorted(ours) == sorted(theirs):
        return "It was trained on these classes in another order"
    return "Likely a classifier of another benchmark, or of these classes in another order"


def _committed(benchmark: str) -> str:
    """`` (e.g. checkpoints/NAME/classifier)`` where the project has one for the benchmark, else nothing."""
    from diffguard_pl.config_shared import EMBEDDED

    folder = EMBEDDED / benchmark / "classifier"
    return f" (e.g. {folder})" if (folder / "classifier.json").is_file() else ""
