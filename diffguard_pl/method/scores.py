"""Per-sample distances between an input and its synthesis: higher = more different = more OOD.

``l1`` / ``l2``: mean absolute / squared pixel difference on [0, 1] images.
``psnr``: minus the PSNR in dB (peak 1 on [0, 1] data), so that higher is farther.
``ssim``: 1 - SSIM (Gaussian window 11 / sigma 1.5, data range 1; equal to piq.ssim).
``logit_l1``: mean absolute difference of the classifier's logits.
``feature_cos``: 1 - cosine similarity of the classifier's penultimate features.
``contrastive``: 1 - cosine similarity of a contrastive encoder's features (``models.encoder``, trained on InD
training images only by ``train.py`` with ``task=encoder``): a semantic distance that does not use the
classifier that guides the synthesis.
``dists`` / ``lpips``: piq's DISTS and LPIPS distances; their weights must exist
locally (nothing is downloaded at run time), see :class:`PerceptualDistances`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from diffguard_pl.errors import MissingCheckpointError

PIXEL = ("l1", "l2", "psnr", "ssim")
CLASSIFIER = ("logit_l1", "feature_cos")
CONTRASTIVE = "contrastive"
PERCEPTUAL = ("dists", "lpips")

# The files piq and torchvision fetch with torch.hub into <torch hub dir>/checkpoints/.
PERCEPTUAL_FILES = {
    "dists": ("dists_weights.pt", "vgg16-397923af.pth"),
    "lpips": ("lpips_weights.pt", "vgg16-397923af.pth"),
}


def psnr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """PSNR in dB per sample for images in [0, 1] (peak value 1)."""
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(eps))


_WINDOWS: Dict[tuple, torch.Tensor] = {}


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``size`` taps (cached per dtype and device)."""
    key = (size, sigma, dtype, device)
    if key not in _WINDOWS:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-coords.pow(2) / (2 * sigma**2))
        _WINDOWS[key] = (g / g.sum()).to(device=device, dtype=dtype)
    return _WINDOWS[key]


def ssim(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM per sample of images [N, C, H, W] in [0, 1] (Wang et al. 2004), averaged over the map and channels.

    Gaussian window (``sigma`` 1.5, ``kernel_size`` 11, or the largest odd size
    that fits a smaller image), valid positions only: the quantity of
    ``piq.ssim(x, y, data_range=1, downsample=False, reduction="none")`` (tests
    compare the two). The five local statistics go through one grouped,
    separable convolution, and nothing reads values back to the host, so it
    costs a few kernels per call (the per-step curves of the inversion call it
    every step).
    """
    c, h, w = x.shape[1:]
    side = min(h, w)
    size = min(kernel_size, side - (1 - side % 2))
    window = _gaussian_window(size, sigma, x.dtype, x.device)
    maps = torch.stack([x, y, x * x, y * y, x * y], dim=1).flatten(1, 2)  # [N, 5C, H, W]
    groups = maps.shape[1]
    maps = F.conv2d(maps, window.view(1, 1, 1, size).expand(groups, 1, 1, size), groups=groups)
    maps = F.conv2d(maps, window.view(1, 1, size, 1).expand(groups, 1, size, 1), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = maps.unflatten(1, (5, c)).unbind(1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    c1, c2 = k1**2, k2**2
    cs = (2 * (e_xy - mu_xy) + c2) / ((e_xx - mu_xx) + (e_yy - mu_yy) + c2)
    ss = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs
    return ss.mean(dim=(-1, -2)).mean(dim=1)


def pixel_distances(x: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """x, y: [N, C, H, W] in [0, 1]."""
    out = {}
    diff = (x - y).flatten(1)
    if "l1" in names:
        out["l1"] = diff.abs().mean(dim=1)
    if "l2" in names:
        out["l2"] = diff.pow(2).mean(dim=1)
    if "psnr" in names:
        out["psnr"] = -psnr(x, y)
    if "ssim" in names:
        out["ssim"] = 1.0 - ssim(x, y)
    return out


def classifier_distances(
    logits_x: torch.Tensor, feats_x: torch.Tensor, logits_y: torch.Tensor, feats_y: torch.Tensor, names: Sequence[str]
) -> Dict[str, torch.Tensor]:
    out = {}
    if "logit_l1" in names:
        out["logit_l1"] = (logits_x - logits_y).abs().mean(dim=1)
    if "feature_cos" in names:
        out["feature_cos"] = cosine_distance(feats_x, feats_y)
    return out


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity per row of two [N, D] feature batches."""
    return 1.0 - F.cosine_similarity(a, b, dim=1)


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def check_perceptual_files(names: Sequence[str]) -> None:
    """Raise, naming the file and folder, when a weights file of a perceptual distance is not in the hub cache."""
    folder = hub_checkpoint_dir()
    for name in names:
        for filename in PERCEPTUAL_FILES.get(name, ()):
            if not (folder / filename).is_file():
                raise MissingCheckpointError(
                    f"distance {name!r} needs {filename} in the torch hub cache {folder} "
                    f"(set TORCH_HOME to move it); nothing is downloaded at run time. Copy the file there "
                    f"from a machine with internet, or drop {name!r} from diffguard.distances."
                )


class PerceptualDistances(torch.nn.Module):
    """piq DISTS / LPIPS from local weights only.

    Images are replicated to 3 channels and resized to ``size`` (None: kept as they are; VGG needs more than
    a few pixels): bilinear, antialiased when shrinking (as torchvision's Resize). ``clamp`` clips them to
    [0, 1] first; the adaptive early stop compares latents unclipped, as the released code does. A missing
    weights file raises an error naming it and the folder it must be placed in.
    """

    def __init__(self, names: Sequence[str], size: Optional[int] = 64, clamp: bool = True):
        super().__init__()
        import piq

        self.size, self.clamp = size, clamp
        check_perceptual_files(names)
        builders = {"dists": lambda: piq.DISTS(reduction="none"), "lpips": lambda: piq.LPIPS(reduction="none")}
        self.metrics = torch.nn.ModuleDict({name: builders[name]() for name in names}).eval()

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.size is not None and images.shape[-1] != self.size:
            shrink = images.shape[-1] > self.size
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=shrink)
        return images.clamp(0, 1) if self.clamp else images

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        x, y = self._prepare(x), self._prepare(y)
        return {name: metric(x, y).flatten() for name, metric in self.metrics.items()}


def perceptual_from(names: Sequence[str], size: Optional[int], load: bool = True) -> Optional[PerceptualDistances]:
    """The perceptual distances among ``names`` (None if none); ``load=False`` only checks their files."""
    wanted = [n for n in names if n in PERCEPTUAL]
    if not load:
        check_perceptual_files(wanted)
        return None
    return PerceptualDistances(wanted, size) if wanted else None
