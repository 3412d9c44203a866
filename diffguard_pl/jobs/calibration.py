"""Calibrate adaptive early stop (AES) thresholds on validation data, never on test data.

    python -m diffguard_pl.jobs.calibration [--config conf/digits_gdm.yaml] [key=value ...]
    python evaluate.py --config conf/digits_gdm.yaml --config OUT/aes.yaml

It records the per-step inversion quality curves of the InD validation split
and picks a threshold for ``calibration.metric``:

- ``method=quantile``: the threshold at which a ``target`` fraction of InD
  validation samples stops before ``diffguard.depth`` (a sample stops once
  its quality falls below the threshold, so it stops iff its lowest quality
  along the inversion is below it);
- ``method=auroc``: among ``candidates`` thresholds (quantiles of those
  lowest qualities), the one whose DiffGuard score separates InD validation
  from the OOD validation sets best (mean AUROC over the sets).

Writes ``OUT/aes.yaml`` (a config fragment to include) and
``OUT/calibration.json`` (every candidate with its AUROC, stop fraction and
mean depth).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from diffguard_pl import config_loading
from diffguard_pl.config import ConfigError, EvalConfig
from diffguard_pl.config_checks import check_choice
from diffguard_pl.data import Benchmark, ImageSet, build_benchmark
from diffguard_pl.models.loading import load_encoder
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.method.aes import lowest_quality
from diffguard_pl.method.pipeline import DiffGuardPipeline


@dataclass
class CalibrationSettings:
    """How the AES threshold is chosen, on validation data only."""

    method: str = "quantile"  # quantile (a target share of InD validation stops early) | auroc (the candidate
                              # threshold whose DiffGuard score separates InD from OOD validation best)
    metric: str = "psnr"  # the AES metric calibrated: psnr (dB) | ssim
    target: float = 0.5  # quantile: fraction of InD validation samples stopping before diffguard.depth, in (0, 1)
    candidates: int = 6  # auroc: thresholds tried (quantiles 0.1..0.9 of the InD samples' lowest quality)
    ood_sets: List[str] = field(default_factory=list)  # auroc: OOD validation sets; empty = the near-OOD sets

    def __post_init__(self) -> None:
        check_choice("calibration.method", self.method, ["quantile", "auroc"])
        check_choice("calibration.metric", self.metric, ["psnr", "ssim"])
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"calibration.target={self.target} must lie in (0, 1)")


@dataclass
class CalibrationConfig(EvalConfig):
    """Root schema of ``python -m diffguard_pl.jobs.calibration``: an evaluation config plus ``calibration``."""

    output_dir: str = "outputs/aes_calibration"  # aes.yaml (the fragment to include), calibration.json
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)


def _batches(images: ImageSet, size: int):
    for start in range(0, len(images), size):
        yield images.images[start : start + size], images.ids[start : start + size]


def score_sets(pipe: DiffGuardPipeline, sets: List[ImageSet], batch_size: int) -> List[dict]:
    out = []
    for images in sets:
        scores, depth = [], []
        for x, ids in _batches(images, batch_size):
            result = pipe(x, ids)
            scores.append(result["scores"][pipe.cfg.score].cpu())
            depth.append(result["depth"].float())
        out.append({"scores": torch.cat(scores), "depth": torch.cat(depth)})
    return out


def calibrate(cfg: CalibrationConfig, benchmark: Optional[Benchmark] = None) -> dict:
    settings = cfg.calibration
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_loading.save(cfg, output_dir / "config.yaml")
    benchmark = benchmark or build_benchmark(cfg.data)
    classifier, diffusion = load_classifier(cfg.models.classifier), load_diffusion(cfg.models.diffusion)
    encoder = load_encoder(cfg)
    limit = cfg.limit_per_set

    def val(s: ImageSet) -> ImageSet:
        return s if limit is None or len(s) <= limit else s.subset(range(limit))

    base = copy.deepcopy(cfg.diffguard)
    base.aes.enabled, base.aes.record_curves = False, True
    pipe = DiffGuardPipeline(diffusion, classifier, base, encoder=encoder)
    ind_val = val(benchmark.val)
    lows = lowest_quality(pipe, ind_val.images, ind_val.ids, settings.metric, cfg.data.eval_batch_size)
    finite = lows[torch.isfinite(lows)].double()

    if settings.method == "quantile":
        chosen = float(torch.quantile(finite, settings.target))
        candidates = [{"threshold": chosen, "stop_fraction": float((lows < chosen).double().mean())}]
    else:
        names = settings.ood_sets or benchmark.ood_names("near")
        unknown = [n for n in names if n not in benchmark.ood]
        if unknown:
            raise ConfigError(f"calibration.ood_sets: unknown set(s) {unknown}; known: {benchmark.ood_names()}")
        sets = [val(benchmark.val)] + [val(benchmark.ood[n].val) for n in names]
        levels = torch.linspace(0.1, 0.9, settings.candidates, dtype=torch.float64)
        candidates = []
        for threshold in torch.quantile(finite, levels).tolist():
            trial = copy.deepcopy(cfg.diffguard)
            trial.aes.enabled = True
            setattr(trial.aes, settings.metric, threshold)
            results = score_sets(DiffGuardPipeline(diffusion, classifier, trial, encoder=encoder), sets,
                                 cfg.data.eval_batch_size)
            ind = results[0]
            per_set = {n: auroc(ind["scores"], r["scores"]) for n, r in zip(names, results[1:])}
            candidates.append({
                "threshold": threshold,
                "stop_fraction": float((lows < threshold).double().mean()),
                "mean_depth_ind": float(ind["depth"].mean()),
                "auroc": sum(per_set.values()) / len(per_set),
                "auroc_per_set": per_set,
            })
        chosen = max(candidates, key=lambda c: c["auroc"])["threshold"]

    fragment = {"diffguard": {"aes": {"enabled": True, settings.metric: chosen, "mode": base.aes.mode,
                                      "min_depth": base.aes.min_depth}}}
    (output_dir / "aes.yaml").write_text(
        f"# AES thresholds calibrated on validation data by diffguard_pl.jobs.calibration ({settings.method}).\n"
        + OmegaConf.to_yaml(OmegaConf.create(fragment))
    )
    report = {"method": settings.method, "metric": settings.metric, "threshold": chosen,
              "depth": cfg.diffguard.depth, "num_ind_val": len(lows), "candidates": candidates}
    (output_dir / "calibration.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {output_dir / 'aes.yaml'}; include it with --config {output_dir / 'aes.yaml'}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    from diffguard_pl.cli import run

    default = config_loading.PRESETS / "digits_gdm.yaml"
    return run(CalibrationConfig, calibrate, sys.argv[1:] if argv is None else argv, str(default),
               "python -m diffguard_pl.jobs.calibration")


if __name__ == "__main__":
    sys.exit(main())
