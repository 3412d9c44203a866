"""The diffusion detectors of an evaluation: built from the config, their heads fitted on InD training images.

DiffPath's and MSMA's mixtures are fitted on the statistics of ``diffusion_detectors.train_samples`` InD
training images (chosen by id hash; never a validation or OOD image). Those statistics cost the detector's UNet
evaluations per image, so they are cached on disk (``<cache>/diffusion/<digest>.pt``, ``<cache>`` as for the
classifier features: ``DIFFGUARD_CACHE`` first, diffguard_pl/detectors/features.py), the name a digest of the
diffusion model's weights, the images (ids and pixels), what the statistics depend on, the dtype and the code that
computes them. They are computed in the dtype the test loop computes the scored images' statistics in (float64 under
``trainer.precision=64-true``), so that a head is fitted on what it scores, and float32 rounding, which depends on
the batch, stays out of the fit. DDPM-OOD is z-scored on the run's InD validation records by the report; LMD fits
nothing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from diffguard_pl.console import Phase, is_rank_zero
from diffguard_pl.detectors import registry
from diffguard_pl.detectors.diffusion import (DiffusionDetector, Statistics, classifier_features,
                                              shared_statistics, statistics_of, unet_evals)
from diffguard_pl.detectors.features import cache_folder, set_digest
from diffguard_pl.errors import ConfigError

STATISTICS_CODE = ("diffguard_pl.method.ddim", "diffguard_pl.method.ddpm_ood", "diffguard_pl.method.lmd",
                   "diffguard_pl.method.diffpath", "diffguard_pl.method.msma", "diffguard_pl.detectors.diffusion")


def build_diffusion_detectors(cfg, diffusion, classifier=None) -> List[DiffusionDetector]:
    """``diffusion_detectors.names`` with their params on the detectors' diffusion model (ConfigError naming a bad
    parameter); ``classifier`` gives the features DDPM-OOD / LMD may read."""
    d = cfg.diffusion_detectors
    features = None if classifier is None else classifier_features(classifier)
    out = []
    for name in d.names:
        try:
            out.append(DiffusionDetector(name, d.params.get(name, {}), diffusion, features=features,
                                         seed=cfg.diffguard.seed))
        except ValueError as error:  # named by its key, unless the message names it
            message = str(error)
            raise ConfigError(message if message.startswith("diffusion_detectors.")
                              else f"diffusion_detectors.params.{name}: {message}") from None
    return out


def model_digest(diffusion) -> str:
    """A digest of a diffusion model: every weight of its denoiser and autoencoder, and its noise schedule."""
    digest = hashlib.sha256(str(diffusion.alphas_cumprod.double().tolist()).encode())
    for part in (diffusion.unet, diffusion.vae):
        for name, tensor in ({} if part is None else part.state_dict()).items():
            digest.update(name.encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def code_version() -> str:
    digest = hashlib.sha256(f"torch {torch.__version__}".encode())
    for name in STATISTICS_CODE:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def batch_statistics(detectors: Sequence[DiffusionDetector], image_set, batch_size: int, device,
                     phase: Optional[Phase] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """Each detector's statistics of a whole set (concatenated over batches, in the set's order), the images in
    ``dtype`` (None: as they are)."""
    parts: dict = {d.name: {} for d in detectors}
    for batch in DataLoader(image_set, batch_size=batch_size):
        stats = statistics_of(detectors, batch["image"].to(device, dtype), list(batch["id"]))
        for name, kinds in stats.items():
            for kind, value in kinds.items():
                parts[name].setdefault(kind, []).append(value)
        if phase is not None:
            phase.advance(len(batch["id"]))
    return {name: {kind: torch.cat(values) for kind, values in kinds.items()} for name, kinds in parts.items()}


def _cache_path(detector: DiffusionDetector, model_key: str, set_key: str, dtype: torch.dtype) -> Path:
    inputs = {"model": model_key, "set": set_key, "statistics": repr(detector.statistics_key()),
              "dtype": str(dtype), "code": code_version()}
    return cache_folder("diffusion") / f"{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()}.pt"


def _read(path: Path) -> Optional[Statistics]:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged entry is computed again
        warnings.warn(f"the cached diffusion statistics {path} cannot be read ({type(error).__name__}); computing "
                      f"them again")
        return None


def _write(path: Path, stats: Statistics) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(stats, partial)
        os.replace(partial, path)
    except OSError as error:
        warnings.warn(f"the diffusion statistics could not be cached in {path.parent} ({error}); the run goes on")


def _dtype(cfg, diffusion) -> torch.dtype:
    """The dtype of the test loop's statistics: float64 under trainer.precision=64-true (Lightning converts the
    detectors' model), else the model's own."""
    return torch.float64 if cfg.trainer.precision == "64-true" else next(diffusion.unet.parameters()).dtype


_CASTS = {torch.float64: "double", torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}


def _move(diffusion, device, dtype: torch.dtype) -> None:
    """The model's modules to ``device``, their floating-point tensors to ``dtype`` (nn.Module's casts: diffusers
    warns at ``to(dtype)``)."""
    for module in diffusion.modules():
        getattr(module.to(device), _CASTS[dtype])()


def _device(cfg, diffusion) -> torch.device:
    """Where the training statistics are computed: the accelerator when the run has one, else the model's device."""
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return next(diffusion.unet.parameters()).device


def fit_diffusion_detectors(detectors: Sequence[DiffusionDetector], benchmark, cfg) -> dict:
    """Fit the heads that need InD training images (``diffusion_detectors.train_samples`` of the training split,
    chosen by id hash; statistics from the cache when computed before) and describe every detector for
    results.json: params, UNet evaluations per image, what it was fitted on and what the fit chose."""
    from diffguard_pl.data.selection import subset_by_id

    choice = {}
    to_fit = [d for d in detectors if d.fit_on == registry.FIT_TRAIN]
    if to_fit:
        train = subset_by_id(benchmark.train, cfg.diffusion_detectors.train_samples, cfg.data.seed)
        diffusion = to_fit[0].diffusion
        model_key, set_key, dtype = model_digest(diffusion), set_digest(train), _dtype(cfg, diffusion)
        stats, missing = {}, []
        for detector in to_fit:
            path = _cache_path(detector, model_key, set_key, dtype)
            found = _read(path)
            if found is None:
                missing.append(detector)
            else:
                stats[detector.name] = found
        if missing:
            evals = unet_evals(missing)
            weight = next(diffusion.unet.parameters())
            device, home = _device(cfg, diffusion), (weight.device, weight.dtype)
            _move(diffusion, device, dtype)
            try:
                with Phase(f"diffusion detectors {', '.join(d.name for d in missing)}: statistics of {len(train):,} "
                           f"InD training images ({evals} UNet evaluations each, {len(train) * evals:,} in all)",
                           len(train)) as phase:
                    computed = batch_statistics(missing, train, cfg.data.eval_batch_size, device, phase, dtype)
            finally:
                _move(diffusion, *home)
            for detector in missing:
                stats[detector.name] = computed[detector.name]
                _write(_cache_path(detector, model_key, set_key, dtype), computed[detector.name])
        elif is_rank_zero():
            print(f"diffusion detectors: statistics of {len(train):,} InD training images read from the cache "
                  f"{cache_folder('diffusion')}", file=sys.stderr, flush=True)
        for detector in to_fit:
            detector.fit(stats[detector.name])
            choice[detector.name] = {"fitted_on": f"{len(train):,} InD training images",
                                     "fit_seconds": detector.fit_seconds, **detector.describe_fit()}
    shared = shared_statistics(detectors)
    for detector in detectors:
        choice[detector.name] = {"params": detector.params, "unet_evals_per_image": detector.unet_evals_per_image(),
                                 **({"shares_statistics_with": shared[detector.name]} if detector.name in shared
                                    else {}),
                                 **choice.get(detector.name, {"fitted_on": detector.fit_on})}
    return choice
