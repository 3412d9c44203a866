"""Classifier detectors fitted on InD training samples, with their hyperparameters chosen on validation splits.

The rule, for every detector with a grid (OpenOOD v1.5's automatic parameter search): each candidate (the grid's
product, every list ascending) is fitted on the InD training samples and scores the InD validation samples and the
pooled OOD validation samples; the candidate with the highest ``AUROC(InD val, OOD val)`` is kept, ties going to
the first candidate (the smaller values). Test splits are never read. A value given in the config is used as it
is; without InD or OOD validation samples nothing is tuned and the registry's defaults are used. The record of
each choice (value, reason, candidates, every candidate's validation AUROC, seconds spent, ms per image) goes to
results.json.

The loop is ours rather than pytorch-ood's ``GridSearch`` because it scores the logits and features the
evaluation computed once (``GridSearch`` runs a detector that takes feature maps through its images for every
candidate) and lets our KNN score its whole grid from one neighbour search (16-18 s against 21 s for five
searches on Fashion-OOD's validation splits, one thread).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from diffguard_pl.detectors import registry as reg
from diffguard_pl.detectors.classifier_parts import (
    ClassifierParts, DetectorUnavailable, Samples, fit, predict, why_not,
)
from diffguard_pl.detectors.metrics import auroc

TUNED = "best validation AUROC (InD val vs pooled OOD val), ties to the smaller value"


@dataclass
class Fitted:
    entry: reg.Detector
    detector: Any  # a pytorch-ood Detector
    params: Dict[str, Any] = field(default_factory=dict)


class ClassifierDetectors:
    """The fitted classifier detectors of an evaluation; :meth:`score` scores a batch from what the pipeline
    computed (logits, features) and, for the few detectors that read them, the images."""

    def __init__(self, parts: ClassifierParts, fitted: Mapping[str, Fitted]):
        self.parts, self.fitted = parts, dict(fitted)

    @property
    def names(self) -> List[str]:
        return list(self.fitted)

    def to(self, device) -> "ClassifierDetectors":
        self.parts.to(device)
        for item in self.fitted.values():
            item.detector.to(device)
        return self

    def score(self, logits: torch.Tensor, features: torch.Tensor,
              images: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Every detector's scores of a batch, float64 on the CPU (higher = more OOD)."""
        # as the detectors were fitted (float32, detectors/features.py), also in a float64 or bfloat16 run
        images = images.float() if images is not None else None
        batch = Samples(logits.detach().float(), features.detach().float(), None, images, max(len(logits), 1))
        return {name: self._score_one(f, batch) for name, f in self.fitted.items()}

    def _score_one(self, fitted: Fitted, batch: Samples) -> torch.Tensor:
        """One detector's scores of a batch. Those reading logits or features (cheap) score one sample at a time:
        in float32 a matrix product's rounding depends on the batch's size, and a sample's score must not."""
        if fitted.entry.reads not in (reg.LOGITS, reg.FEATURES) or len(batch) <= 1:
            return predict(fitted.detector, fitted.entry, self.parts, batch)
        rows = [predict(fitted.detector, fitted.entry, self.parts, batch.rows(torch.tensor([i])))
                for i in range(len(batch))]
        return torch.cat(rows)


def sizes_for(train: Samples) -> reg.Sizes:
    """The limits' inputs for a detector fitted on ``train`` (its rows already chosen by :func:`train_rows`)."""
    return reg.Sizes(len(train), train.features.shape[1], train.logits.shape[1])


def fit_rows(entry: reg.Detector, n: int) -> int:
    """How many InD training samples a detector is fitted on (its ``fit_fraction`` of ``n``, at least one)."""
    return n if entry.fit_fraction is None else min(n, max(1, math.ceil(entry.fit_fraction * n)))


def resolve_grid(entry: reg.Detector, sizes: reg.Sizes,
                 override: Optional[Mapping[str, Sequence]] = None) -> Tuple[Dict[str, list], Dict[str, list]]:
    """The grid for this classifier and data, and the values dropped for exceeding a limit (none left: the
    limit itself). ``override``: grids from the config, by hyperparameter."""
    grid, dropped = {}, {}
    for key, values in {**entry.grid, **(override or {})}.items():
        values = sorted(set(values(sizes) if callable(values) else values))
        limit = entry.limits.get(key)
        if limit is not None:
            most = limit(sizes)
            kept = [v for v in values if v <= most]
            dropped[key] = [v for v in values if v > most]
            values = kept or [most]
        grid[key] = values
    return grid, {k: v for k, v in dropped.items() if v}


def resolve_defaults(entry: reg.Detector, sizes: reg.Sizes) -> Dict[str, Any]:
    """The registry's defaults for this classifier and data (functions evaluated, limits applied)."""
    out = {}
    for key, value in entry.defaults.items():
        value = value(sizes) if callable(value) else value
        limit = entry.limits.get(key)
        out[key] = min(value, limit(sizes)) if limit is not None else value
    return out


def check_fixed(entry: reg.Detector, sizes: reg.Sizes, fixed: Mapping[str, Any]) -> None:
    """ValueError (naming the config key and the fix) for a configured value beyond a limit."""
    for key, value in fixed.items():
        limit = entry.limits.get(key)
        if limit is not None and not 0 < value <= limit(sizes):
            raise ValueError(f"baselines.params.{entry.name}.{key}={value} must lie in (0, {limit(sizes)}] for this "
                             f"classifier and data: lower it, raise baselines.train_samples, or drop it to tune it")


def label(params: Mapping[str, Any]) -> str:
    """A candidate's key in results.json: ``"50"`` for one hyperparameter, ``"gamma=0.1, M=6"`` for several."""
    if len(params) <= 1:
        return str(next(iter(params.values()))) if params else "default"
    return ", ".join(f"{k}={v}" for k, v in params.items())


def train_rows(entry: reg.Detector, train: Samples) -> Samples:
    """The InD training samples a detector is fitted on: all, or its ``fit_fraction`` (a seeded choice)."""
    rows = fit_rows(entry, len(train))
    if rows == len(train):
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    return train.rows(order[:rows].sort().values)


def _auroc(ind: torch.Tensor, ood: torch.Tensor) -> Optional[float]:
    """The validation AUROC; None when a score is not finite."""
    if not (torch.isfinite(ind).all() and torch.isfinite(ood).all()):
        return None
    return auroc(ind, ood)


def choose(entry: reg.Detector, parts: ClassifierParts, train: Samples, val_ind: Optional[Samples],
           val_ood: Optional[Samples], fixed: Optional[Mapping[str, Any]] = None,
           grid_override: Optional[Mapping[str, Sequence]] = None) -> Tuple[Fitted, dict]:
    """Fit one detector, its hyperparameters chosen by the rule of this module; returns it and its record."""
    started = time.perf_counter()
    train = train_rows(entry, train)
    sizes = sizes_for(train)
    fixed = dict(fixed or {})
    check_fixed(entry, sizes, fixed)
    grid, dropped = resolve_grid(entry, sizes, grid_override)
    has_val = val_ind is not None and val_ood is not None and len(val_ind) and len(val_ood)
    free = {k: v for k, v in grid.items() if k not in fixed}
    if not has_val and free:
        missing = [n for n, s in (("InD", val_ind), ("OOD", val_ood)) if s is None or not len(s)]
        reason = f"no {' or '.join(missing)} validation data: the registry's default values"
        candidates = [{**resolve_defaults(entry, sizes), **fixed}]
    else:
        reason = (TUNED if free else "fixed by config (baselines.params)" if fixed
                  else "no grid: the registry's default values" if entry.defaults else "no hyperparameters")
        candidates = [{**dict(zip(free, values)), **fixed} for values in itertools.product(*free.values())]
        candidates = [{**resolve_defaults(entry, sizes), **c} for c in candidates]
    tried = list(_candidates(entry, parts, train, val_ind if has_val else None, val_ood if has_val else None,
                             candidates))
    val_auroc = {label(f.params): a for f, a in tried} if has_val else {}
    ranked = [(a, -i) for i, (_, a) in enumerate(tried) if a is not None]
    if has_val and not ranked:
        raise DetectorUnavailable("gives non-finite scores on the validation samples for every candidate")
    best = tried[-max(ranked)[1]][0] if ranked else tried[0][0]
    ms = _ms_per_image(best, parts, val_ind)
    record = {**best.params, "params": best.params, "reason": reason, "grid": grid, "dropped": dropped,
              "grid_source": entry.grid_source, "val_auroc": val_auroc, "fit_samples": len(train),
              "seconds": time.perf_counter() - started, "ms_per_image": ms}
    return best, record


def _candidates(entry: reg.Detector, parts: ClassifierParts, train: Samples, val_ind: Optional[Samples],
                val_ood: Optional[Samples], candidates: List[dict]):
    """(fitted candidate, its validation AUROC: None without validation samples or with non-finite scores), in
    order. A detector with ``predict_grid`` (our KNN) scores the grid of its one hyperparameter from one fit."""
    first = parts.build(entry, candidates[0])
    key = next(iter(candidates[0])) if len(candidates[0]) == 1 else None
    if hasattr(first, "predict_grid") and key is not None and val_ind is not None:
        fit(first, entry, parts, train)
        values = [c[key] for c in candidates]
        ind, ood = first.predict_grid(val_ind.features, values), first.predict_grid(val_ood.features, values)
        for c in candidates:
            chosen = copy.copy(first)  # the same fitted state, another value
            setattr(chosen, key, c[key])
            yield Fitted(entry, chosen, c), _auroc(ind[c[key]].cpu(), ood[c[key]].cpu())
        return
    for c in candidates:
        detector = fit(parts.build(entry, c), entry, parts, train)
        scores = None if val_ind is None else _auroc(predict(detector, entry, parts, val_ind),
                                                     predict(detector, entry, parts, val_ood))
        yield Fitted(entry, detector, c), scores


def _ms_per_image(fitted: Fitted, parts: ClassifierParts, val_ind: Optional[Samples]) -> Optional[float]:
    """Milliseconds per image of the chosen detector scoring the InD validation samples from their logits and
    features (and images, where it reads them); None without InD validation samples."""
    if val_ind is None or not len(val_ind):
        return None
    started = time.perf_counter()
    predict(fitted.detector, fitted.entry, parts, val_ind)
    return 1000 * (time.perf_counter() - started) / len(val_ind)


def fit_detectors(names: Sequence[str], parts: ClassifierParts, train: Samples, val_ind: Optional[Samples],
                  val_ood: Optional[Samples], params: Optional[Mapping[str, Mapping]] = None,
                  grids: Optional[Mapping[str, Mapping]] = None,
                  progress: Optional[Callable[[str], None]] = None) -> Tuple[ClassifierDetectors, dict]:
    """Every detector of ``names`` fitted and tuned, those that cannot run on this classifier left out; returns the
    fitted set and the choice (results.json's ``baselines``: a record per detector, ``left_out``: name -> reason,
    ``validation``: the numbers of InD and OOD validation samples)."""
    params, grids = params or {}, grids or {}
    labelled = train.labels is not None and bool((train.labels >= 0).all())
    fitted: Dict[str, Fitted] = {}
    choice: dict = {}
    left_out: Dict[str, str] = {}
    for name in names:
        entry = reg.classifier_detector(name)
        reason = why_not(entry, parts, labelled)
        if reason is None:
            try:
                fitted[name], choice[name] = choose(entry, parts, train, val_ind, val_ood, params.get(name),
                                                    grids.get(name))
            except DetectorUnavailable as error:
                reason = str(error)
            except (ValueError, AssertionError, RuntimeError) as error:
                if str(error).startswith("baselines."):
                    raise  # the config asks for what this classifier and data cannot give
                reason = f"fails on this classifier and data: {type(error).__name__}: {_first_line(error)}"
        if reason is not None:
            left_out[name] = reason
        if progress is not None:
            progress(name)
    choice["left_out"] = left_out
    choice["validation"] = {"ind": len(val_ind) if val_ind is not None else 0,
                            "ood": len(val_ood) if val_ood is not None else 0}
    return ClassifierDetectors(parts, fitted), choice


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"
