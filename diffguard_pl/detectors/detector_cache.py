"""The fitted and tuned classifier detectors of an evaluation, cached on disk beside the classifier features.

Fitting the classifier detectors and choosing their hyperparameters on validation splits took 14 s of a tiny
Fashion-OOD run's 22 s second start, the same work every time: what it gives depends only on the classifier, the
samples it reads, the detectors asked for and the code that fits them. An entry is kept in
``<cache>/detectors/<digest>.pt`` (``<cache>``: features.py's folder rule, ``DIFFGUARD_CACHE`` first), its name a
digest of all of it (:func:`entry_path`): the classifier (its spec and weights), the InD training, InD validation
and pooled OOD validation sets (ids, pixels, labels), ``baselines.detectors`` / ``params`` / ``grids`` /
``train_samples``, the batch size and device type they were fitted with, and the fitting code itself (the source of
the modules that fit them, torch's and pytorch-ood's versions). Any change misses the cache; delete the folder to
clear it.

An entry holds the choice (results.json's ``baselines``; each record read back says ``cached: true``, its
``seconds`` and ``ms_per_image`` those of the fit that wrote it) and each detector's fitted state: the attributes
fitting gave it that a detector built anew with the chosen hyperparameters lacks. Restored onto a detector built
on this run's classifier, they score bit for bit as the fit did. The state is kept only when it is plain data
(tensors, numbers, strings, lists / tuples / dicts of them, a ``ParameterDict``) so that it is read back with
``torch.load(weights_only=True)``; a detector whose state holds other objects (openmax's Weibull models, nac's layer
statistics, mds_odin's inner detector) is fitted again at each start.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from diffguard_pl.config import BaselineConfig
from diffguard_pl.console import is_rank_zero
from diffguard_pl.detectors import registry as reg
from diffguard_pl.detectors.classifier_parts import ClassifierParts
from diffguard_pl.detectors.features import cache_folder
from diffguard_pl.detectors.tuning import ClassifierDetectors, Fitted

# The modules whose code decides a fitted detector's state: a change to any of them misses every entry.
FITTING_CODE = ("diffguard_pl.detectors.registry", "diffguard_pl.detectors.classifier_parts",
                "diffguard_pl.detectors.tuning", "diffguard_pl.detectors.baselines", __name__)
VALUE, PARAMETER_DICT = "value", "parameter_dict"  # how an attribute of a fitted state is stored


def fitting_code_version() -> str:
    """A digest of the code that fits the classifier detectors: :data:`FITTING_CODE`'s sources, torch's and
    pytorch-ood's versions."""
    digest = hashlib.sha256(f"torch {torch.__version__}, pytorch-ood {version('pytorch-ood')}".encode())
    for name in FITTING_CODE:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def labels_digest(labels: Optional[torch.Tensor]) -> Optional[str]:
    """A digest of a set's labels (some detectors are fitted on them; the feature cache's set digest omits them)."""
    if labels is None:
        return None
    return hashlib.sha256(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def entry_path(classifier_key: str, data: Mapping[str, Any], baselines: BaselineConfig, batch_size: int,
               device: torch.device) -> Path:
    """Where the detectors fitted with these inputs are cached. ``classifier_key``: features.classifier_digest;
    ``data``: per set the detectors read, its digests (features.set_digest, :func:`labels_digest`)."""
    inputs = {"code": fitting_code_version(), "classifier": classifier_key, "data": dict(data),
              "detectors": list(baselines.detectors), "params": baselines.params, "grids": baselines.grids,
              "train_samples": baselines.train_samples, "batch_size": batch_size, "device": torch.device(device).type}
    key = hashlib.sha256(json.dumps(inputs, default=repr).encode()).hexdigest()
    return cache_folder("detectors") / f"{key[:32]}.pt"


# ----------------------------------------------------------------------------------- a detector's fitted state


def _same(a: Any, b: Any) -> bool:
    """Whether two attribute values are the same value (tensors: same type, dtype, shape, device and elements;
    modules: same type, mode and state)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and type(a) is type(b) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and a.requires_grad == b.requires_grad
                and torch.equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, nn.Module):  # a copy made when built (nci's head): the same unless fitting changed it
        sa, sb = a.state_dict(), b.state_dict()
        return a.training == b.training and sa.keys() == sb.keys() and all(_same(sa[k], sb[k]) for k in sa)
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # e.g. lists of tensors: compared as different, kept
        return False


def _is_plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``value`` back as it was."""
    if torch.is_tensor(value):
        return value.is_leaf or not value.requires_grad  # torch.save refuses a non-leaf tensor requiring grad
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (list, tuple):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    return False


def fitted_state(fitted: Fitted, parts: ClassifierParts) -> Optional[Dict[str, tuple]]:
    """What fitting gave a detector: each attribute that a detector built anew with the same hyperparameters lacks
    or holds another value of, as ``(VALUE, value)`` or ``(PARAMETER_DICT, {name: parameter})``; None when one is
    neither plain data nor a ``ParameterDict`` of tensors (the detector is then fitted again at each start)."""
    fresh, fitted_vars = vars(parts.build(fitted.entry, fitted.params)), vars(fitted.detector)
    if set(fresh) - set(fitted_vars):
        return None  # fitting removed an attribute: setting attributes cannot restore that
    state = {}
    for name, value in fitted_vars.items():
        if name in fresh and _same(value, fresh[name]):
            continue
        if isinstance(value, nn.ParameterDict) and all(torch.is_tensor(v) for v in value.values()):
            state[name] = (PARAMETER_DICT, dict(value.items()))
        elif _is_plain(value):
            state[name] = (VALUE, value)
        else:
            return None
    return state


def restore(entry: reg.Detector, params: Mapping[str, Any], state: Mapping[str, tuple],
            parts: ClassifierParts) -> Fitted:
    """The detector ``entry`` with ``params`` built on ``parts``, given the fitted ``state``."""
    detector = parts.build(entry, params)
    for name, (kind, value) in state.items():
        if kind not in (VALUE, PARAMETER_DICT):
            raise ValueError(f"{entry.name}.{name} is stored as {kind!r}, which this code does not read")
        setattr(detector, name, nn.ParameterDict(value) if kind == PARAMETER_DICT else value)
    return Fitted(entry, detector, dict(params))


# ----------------------------------------------------------------------------------- an entry on disk


@dataclass
class Restored:
    """A cache entry read back: the detectors restored, the choice (records marked ``cached``), and the names of
    the detectors whose state the entry does not keep (to fit again, in the choice's order)."""

    fitted: Dict[str, Fitted]
    choice: dict
    refit: List[str]


def write(path: Path, classifier_detectors: ClassifierDetectors, choice: dict) -> str:
    """Cache the fitted detectors and their choice in ``path`` (written whole or not at all); returns a note for the
    console: where, and which detectors' state it does not keep, or why nothing was written."""
    parts = classifier_detectors.parts
    states = {name: fitted_state(f, parts) for name, f in classifier_detectors.fitted.items()}
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": path.stem, "choice": choice, "states": states}, partial)
        partial.replace(path)  # atomic: a reader never sees half a file
    except OSError as error:  # a read-only home or a full disk: the run goes on without a cache, and says so
        partial.unlink(missing_ok=True)
        return f" (not cached: {error.strerror or error})"
    kept_out = [name for name, state in states.items() if state is None]
    return f" (cached in {path}" + (f"; {', '.join(kept_out)} fitted again at each start" if kept_out else "") + ")"


def read(path: Path, parts: ClassifierParts) -> Optional[Restored]:
    """The entry at ``path`` restored onto ``parts``; None when there is none. An entry that cannot be read or
    restored (damaged, written by other code) gives None and a one-line warning: the detectors are fitted again
    and the entry rewritten."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location=parts.device, weights_only=True)
        if saved["key"] != path.stem:
            raise ValueError(f"it holds the entry {saved['key']}")
        choice, states = saved["choice"], saved["states"]
        fitted, refit = {}, []
        for name in states:
            if states[name] is None:
                refit.append(name)
            else:
                fitted[name] = restore(reg.classifier_detector(name), choice[name]["params"], states[name], parts)
                choice[name]["cached"] = True
        return Restored(fitted, choice, refit)
    except Exception as error:  # noqa: BLE001 - whatever is wrong with the file, fitting again is right
        if is_rank_zero():
            print(f"warning: the cached classifier detectors {path} cannot be read ({type(error).__name__}: "
                  f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no message'}): fitting them "
                  f"again", file=sys.stderr, flush=True)
        return None
