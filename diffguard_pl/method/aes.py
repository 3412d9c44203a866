"""Adaptive early stop (AES): when a sample stops inverting.

After every inversion step the latent x_t is compared with the input x0
(both mapped to [0, 1] as (x + 1) / 2, without clipping, as the released code
does): PSNR in dB with peak 1, SSIM (of the clamped images), and similarity
1 - DISTS when configured (on the unclamped images, at ``aes.dists_size``). The rule (``any`` or
``all`` of the configured thresholds) stops a sample once its quality falls
below them, never before ``min_depth`` steps; ``diffguard.depth`` is the
maximum. Without AES every sample stops at ``diffguard.depth``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from diffguard_pl.config import AESConfig
from diffguard_pl.method.scores import PerceptualDistances, psnr, ssim


class AdaptiveEarlyStop:
    def __init__(self, cfg: AESConfig, perceptual_size: Optional[int] = 64):
        self.cfg = cfg
        self.thresholds = {k: getattr(cfg, k) for k in ("psnr", "ssim", "dists")}
        self.thresholds = {k: v for k, v in self.thresholds.items() if cfg.enabled and v is not None}
        names: List[str] = ["psnr", "ssim"] if (cfg.record_curves or cfg.enabled) else []
        names += [k for k in self.thresholds if k not in names]
        self.curve_names = names
        self.dists: Optional[PerceptualDistances] = (
            PerceptualDistances(["dists"], cfg.dists_size or perceptual_size, clamp=False) if "dists" in names else None
        )

    @torch.no_grad()
    def quality(self, latent: torch.Tensor, x0: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample similarity of a latent to its input (model-space tensors)."""
        if not self.curve_names or len(latent) == 0:
            return {name: latent.new_zeros(len(latent)) for name in self.curve_names}
        a, b = (latent + 1) / 2, (x0 + 1) / 2
        out = {}
        if "psnr" in self.curve_names:
            out["psnr"] = psnr(a, b)
        if "ssim" in self.curve_names:
            out["ssim"] = ssim(a.clamp(0, 1), b.clamp(0, 1))
        if self.dists is not None:
            out["dists"] = 1.0 - self.dists(a, b)["dists"]
        return out

    def should_stop(self, quality: Dict[str, torch.Tensor], depth: torch.Tensor, max_depth: int) -> torch.Tensor:
        """Boolean mask: stop after ``depth`` inversion steps (per sample)."""
        at_max = depth >= max_depth
        if not self.thresholds:
            return at_max
        below = [quality[name] < value for name, value in self.thresholds.items()]
        fired = torch.stack(below).any(0) if self.cfg.mode == "any" else torch.stack(below).all(0)
        return at_max | (fired & (depth >= self.cfg.min_depth))


def lowest_quality(pipeline, images: torch.Tensor, ids: List[str], metric: str, batch_size: int) -> torch.Tensor:
    """Per sample, the lowest ``metric`` along a full-depth inversion by ``pipeline`` (a DiffGuardPipeline; AES
    off): what AES calibration chooses its threshold from (diffguard_pl/jobs/calibration.py, the pytorch-ood
    wrapper's ``fit``)."""
    lows = []
    for start in range(0, len(images), batch_size):
        x, batch_ids = images[start : start + batch_size], ids[start : start + batch_size]
        curve = pipeline.invert(x.to(pipeline.device), batch_ids)["curves"][metric]
        lows.append(torch.nan_to_num(curve, nan=float("inf")).amin(dim=1).cpu())
    return torch.cat(lows)
