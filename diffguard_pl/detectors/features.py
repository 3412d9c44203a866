"""The classifier's logits and penultimate features on a set of images, cached on disk.

Every evaluation fits the classifier detectors on the InD training images (30,600 for Fashion-OOD, 1.28M for
ImageNet) and tunes them on the validation splits: the features of those sets depend only on the classifier's
weights and the images, so they are computed once and kept in ``$XDG_CACHE_HOME/diffguard_pl/features``
(``~/.cache/diffguard_pl/features`` without it; ``DIFFGUARD_CACHE`` overrides ``$XDG_CACHE_HOME/diffguard_pl``).
A cache entry's name is a digest of the classifier (its spec and every weight) and of the set (its ids and every
pixel), so a retrained classifier or changed data never reads a stale entry. Delete the folder to clear it. The
detectors fitted on these features are cached beside them (diffguard_pl/detectors/detector_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from diffguard_pl.console import Phase, is_rank_zero
from diffguard_pl.models import Classifier


def cache_folder(what: str = "features") -> Path:
    """Where cached ``what`` live: ``features`` (this module) or ``detectors`` (detector_cache.py), under
    ``DIFFGUARD_CACHE``, else ``$XDG_CACHE_HOME/diffguard_pl``, else ``~/.cache/diffguard_pl``."""
    if os.environ.get("DIFFGUARD_CACHE"):
        return Path(os.environ["DIFFGUARD_CACHE"]) / what
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffguard_pl" / what


def _update(digest, tensor: torch.Tensor) -> None:
    digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def classifier_digest(classifier: Classifier) -> str:
    """A digest of the classifier's spec and weights (its buffers too). The spec's ``trained_on`` (train.py's
    record of its training, not part of the model) is left out: recording it keeps the cached entries."""
    spec = {k: v for k, v in asdict(classifier.spec).items() if k != "trained_on"}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for name, tensor in classifier.model.state_dict().items():
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest()


def set_digest(image_set) -> str:
    """A digest of a set's ids and images (every pixel of an in-memory set; a file set's ``content_key``: the
    files' paths, sizes and modification times, and its transform)."""
    digest = hashlib.sha256("\n".join(image_set.ids).encode())
    if hasattr(image_set, "content_key"):
        digest.update(image_set.content_key().encode())
    else:
        _update(digest, image_set.images)
    return digest.hexdigest()


@torch.no_grad()
def compute_outputs(classifier: Classifier, image_set, batch_size: int, num_workers: int = 0,
                    phase: Optional[Phase] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's (logits [N, C], features [N, D]) on a set, float32 on its device (N may be 0)."""
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    logits, feats = [], []
    if image_set is not None and len(image_set) > 0:
        for batch in DataLoader(image_set, batch_size=batch_size, num_workers=num_workers):
            lo, fe = classifier.forward_with_features(batch["image"].to(device))
            logits.append(lo.float())
            feats.append(fe.float())
            if phase is not None:
                phase.advance(len(lo))
    if not logits:
        head = classifier.model.get_classifier()
        return head.weight.new_zeros(0, head.weight.shape[0]), head.weight.new_zeros(0, head.weight.shape[1])
    return torch.cat(logits), torch.cat(feats)


def classifier_outputs(classifier: Classifier, image_set, batch_size: int, num_workers: int = 0,
                       what: str = "images", cache: bool = True, classifier_key: Optional[str] = None,
                       set_key: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_outputs`, read from the cache when this classifier already saw this set (and written to
    it otherwise); says which, and how long it took, on the console. ``classifier_key`` / ``set_key``: the
    classifier's and the set's digests where the caller has them (:func:`classifier_digest`, :func:`set_digest`),
    so that they are not computed again."""
    if image_set is None or len(image_set) == 0 or not cache:
        with Phase(f"classifier features of {what}", len(image_set) if image_set is not None else 0) as phase:
            return compute_outputs(classifier, image_set, batch_size, num_workers, phase)
    device = next(classifier.parameters()).device
    classifier_key, set_key = classifier_key or classifier_digest(classifier), set_key or set_digest(image_set)
    path = cache_folder() / f"{classifier_key[:24]}-{set_key[:24]}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            if is_rank_zero():
                print(f"classifier features of {what}: {len(image_set):,} images read from the cache {path}",
                      file=sys.stderr, flush=True)
            return saved["logits"], saved["features"]
        except (OSError, RuntimeError, KeyError, EOFError):
            pass  # a damaged entry (an interrupted write elsewhere): computed and written again below
    with Phase(f"classifier features of {what}", len(image_set)) as phase:
        logits, feats = compute_outputs(classifier, image_set, batch_size, num_workers, phase)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"logits": logits.cpu(), "features": feats.cpu()}, partial)
            partial.replace(path)  # atomic: a reader never sees half a file
            phase.note = f" (cached in {path})"
        except OSError as error:  # a read-only home: the run goes on without a cache, and says so
            phase.note = f" (not cached: {error.strerror or error})"
    return logits, feats
