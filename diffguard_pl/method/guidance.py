"""Classifier guidance with clean grad and cutout (DiffGuard, GDM path).

The classifier never sees the noisy latent: it sees a clean estimate

    x_clean = x0_pred                          (clean = "x0_pred")
    x_clean = f * x0_pred + (1 - f) * x_t      (clean = "blend", f = sqrt(1 - a_t), the released code)
    x_clean = x_t                              (clean = "noisy", plain classifier guidance)

where x0_pred comes from the same UNet pass that gave eps. The gradient of
log p(y | x_clean) is taken with respect to x_clean only (nothing flows back
through the UNet) and applied as

    eps_hat = eps - scale * sqrt(1 - a_t) * grad.

With x0 clipping (guided-diffusion's order), the step uses the eps re-derived
from the clipped x0 and the guidance term is added to that eps, while the
classifier still sees the clean estimate built from the unclipped x0.

Cutout: K random square crops of x_clean, each resized to the classifier's
input size; their log-probabilities are summed. Two modes: ``bilinear``
(continuous crop sides and positions, one batched ``grid_sample``) and
``released`` (the released code's whole-pixel crops, sides from
round(min_frac * S) up to round(max_frac * S) - 1 of an S-pixel image, resized
by nearest neighbour exactly as ``F.interpolate(mode="nearest")`` does, one
batched gather). Crop positions and sizes are drawn once per sample from a
generator seeded by the sample's id, so a sample gets the same crops whatever
batch, order or process it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from diffguard_pl.config import CutoutConfig, GuidanceConfig
from diffguard_pl.seeding import sample_seed
from diffguard_pl.method.ddim import Coefficients, predict_x0, step_coefficients
from diffguard_pl.models.classifier import Classifier


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors up to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def cutout_params(ids: Sequence[str], num_steps: int, cfg: CutoutConfig, seed: int = 0,
                  image_size: Optional[int] = None) -> torch.Tensor:
    """Crop parameters [N, num_steps, K, 3] per sample: (side, left, top).

    ``bilinear``: fractions of the image side; ``released``: whole pixels of an ``image_size`` image (side in
    [round(min_frac S), round(max_frac S)), left and top uniform over the positions where the crop fits).
    Each sample's values come from its own generator (seeded by its id), so they do not depend on the rest
    of the batch; the first steps' values do not depend on ``num_steps``.
    """
    params = torch.empty(len(ids), num_steps, cfg.num, 3, dtype=torch.float64)
    for i, sample_id in enumerate(ids):
        g = torch.Generator().manual_seed(sample_seed(sample_id, seed))
        u = torch.rand(num_steps, cfg.num, 3, generator=g, dtype=torch.float64)
        if cfg.mode == "released":
            if image_size is None:
                raise ValueError("released cutouts are whole pixels: pass image_size")
            low, high = round(cfg.min_frac * image_size), round(cfg.max_frac * image_size)
            side = torch.floor(low + (high - low) * u[..., 0]).clamp(max=max(low, high - 1))
            params[i, ..., 0] = side
            params[i, ..., 1] = torch.floor(u[..., 1] * (image_size - side + 1))
            params[i, ..., 2] = torch.floor(u[..., 2] * (image_size - side + 1))
            continue
        side = cfg.min_frac + (cfg.max_frac - cfg.min_frac) * u[..., 0]
        params[i, ..., 0] = side
        params[i, ..., 1] = (1 - side) * u[..., 1]
        params[i, ..., 2] = (1 - side) * u[..., 2]
    return params


def crop_affine(params: torch.Tensor) -> torch.Tensor:
    """Crop parameters [..., 3] (side, left, top fractions) -> the affine maps [..., 2, 3] of ``affine_grid``.

    The crop of side s at (left, top) maps output coordinates u in [-1, 1] to
    input coordinates s * u + (2 * left + s - 1) (likewise vertically).
    """
    side, left, top = params.unbind(-1)
    zero = torch.zeros_like(side)
    row_x = torch.stack([side, zero, 2 * left + side - 1], dim=-1)
    row_y = torch.stack([zero, side, 2 * top + side - 1], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)


def nearest_indices(offset: torch.Tensor, side: torch.Tensor, size: int) -> torch.Tensor:
    """Source indices [..., size] of a crop (``offset``, ``side`` in pixels) resized to ``size`` by nearest
    neighbour, with PyTorch's own rule: floor(j * float32(side / size)), so the result equals
    ``F.interpolate(crop, size, mode="nearest")`` to the pixel."""
    scale = side.to(torch.float32) / size
    j = torch.arange(size, dtype=torch.float32, device=side.device)
    source = torch.floor(j * scale.unsqueeze(-1)).long()
    source = torch.minimum(source, side.long().unsqueeze(-1) - 1)
    return offset.long().unsqueeze(-1) + source


def nearest_cutout(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Whole-pixel crops, nearest-resized: images [N, C, H, W], params [N, K, 3] pixels -> [N * K, C, size, size].

    Sample-major, like :func:`cutout`; one gather per axis, differentiable with respect to ``images``.
    """
    n, k = params.shape[:2]
    c, h, w = images.shape[1:]
    rows = nearest_indices(params[..., 2], params[..., 0], size).reshape(n * k, 1, size, 1)
    cols = nearest_indices(params[..., 1], params[..., 0], size).reshape(n * k, 1, 1, size)
    source = images.unsqueeze(1).expand(-1, k, c, h, w).reshape(n * k, c, h, w)
    picked = source.gather(2, rows.to(images.device).expand(-1, c, -1, w))
    return picked.gather(3, cols.to(images.device).expand(-1, c, size, -1))


def cutout(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Crop and resize: images [N, C, H, W], params [N, K, 3] -> crops [N * K, C, size, size] (sample-major).

    ``params`` may also be their affine maps [N, K, 2, 3] (:func:`crop_affine`), which the pipeline builds
    once for all steps. One batched ``grid_sample``; differentiable with respect to ``images``.
    """
    theta = crop_affine(params) if params.ndim == 3 else params
    n, k = theta.shape[:2]
    theta = theta.reshape(n * k, 2, 3).to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n * k, images.shape[1], size, size], align_corners=False)
    # Each image k times, sample-major (repeat_interleave with a count may read its size back from the device).
    source = images.unsqueeze(1).expand(-1, k, *images.shape[1:]).reshape(n * k, *images.shape[1:])
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)


def clean_estimate(x_t: torch.Tensor, eps: torch.Tensor, a_t: Optional[torch.Tensor], mode: str,
                   coef_t: Optional[Coefficients] = None) -> torch.Tensor:
    """The classifier's input (see the module docstring); ``coef_t`` = step_coefficients(a_t, x_t) if precomputed."""
    if mode == "noisy":
        return x_t
    coef_t = coef_t if coef_t is not None else step_coefficients(a_t, x_t)
    x0 = predict_x0(x_t, eps, a_t, coef_t)
    if mode == "x0_pred":
        return x0
    f = coef_t[1]  # sqrt(1 - a_t)
    return f * x0 + (1 - f) * x_t


def log_prob_grad(
    classifier: Classifier, x_clean: torch.Tensor, labels: torch.Tensor, crop_params: Optional[torch.Tensor],
    mode: str = "bilinear",
) -> torch.Tensor:
    """grad of sum_crops log p(y | crop) with respect to x_clean (model space, [-1, 1]).

    ``crop_params``: [N, K, 3] crop parameters or their affine maps [N, K, 2, 3] (see :func:`cutout`); with
    ``mode="released"`` whole-pixel boxes [N, K, 3] (see :func:`nearest_cutout`).

    The classifier must be in eval mode, so samples do not interact.
    """
    with torch.enable_grad():
        x = x_clean.detach().requires_grad_(True)
        images01 = (x + 1) / 2
        if crop_params is not None and crop_params.shape[1] > 0:
            k = crop_params.shape[1]
            crop = nearest_cutout if mode == "released" else cutout
            images01 = crop(images01, crop_params, classifier.spec.input_size)
            labels = labels.view(-1, 1).expand(-1, k).reshape(-1)  # each label k times, sample-major
        log_probs = torch.log_softmax(at_least_float32(classifier(images01)), dim=1)
        selected = log_probs.gather(1, labels.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, x)
    return grad


def guided_eps(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    a_t: Optional[torch.Tensor],
    labels: torch.Tensor,
    classifier: Classifier,
    cfg: GuidanceConfig,
    crop_params: Optional[torch.Tensor] = None,
    coef_t: Optional[Coefficients] = None,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """eps_hat = eps - scale * sqrt(1 - a_t) * grad log p(y | x_clean); ``crop_params`` as in :func:`cutout` or None.

    ``coef_t``: step_coefficients(a_t, x_t) when precomputed (then ``a_t`` may be None); same result.
    ``base``: the eps the guidance term is added to, when it is not ``eps`` itself (with x0 clipping: the eps
    re-derived from the clipped x0); the clean estimate always comes from ``eps``.
    """
    base = eps if base is None else base
    if cfg.scale == 0:
        return base
    coef_t = coef_t if coef_t is not None else step_coefficients(a_t, x_t)
    x_clean = clean_estimate(x_t, eps, a_t, cfg.clean, coef_t)
    grad = log_prob_grad(classifier, x_clean, labels, crop_params, cfg.cutout.mode)
    sigma = coef_t[1].to(eps.dtype)  # sqrt(1 - a_t); eps and x_t share their dtype in the pipeline
    return base - sigma * (grad * cfg.scale)  # guided-diffusion's condition_score: the cond_fn returns grad * scale


@dataclass
class CutoutPlan:
    """Every sample's crops at every synthesis level of one run, drawn once (see :func:`cutout_params`).

    ``params``: affine maps [N, levels, K, 2, 3] (bilinear) or whole-pixel boxes [N, levels, K, 3] (released);
    index ``level - 1`` holds the crops of the synthesis step from ``level``.
    """

    params: torch.Tensor

    @classmethod
    def draw(cls, ids: Sequence[str], levels: int, cfg: CutoutConfig, seed: int, image_size: int,
             dtype: torch.dtype) -> "CutoutPlan":
        params = cutout_params(ids, levels, cfg, seed, image_size)
        return cls(params if cfg.mode == "released" else crop_affine(params).to(dtype))

    def at(self, rows: Optional[torch.Tensor], level, device: torch.device) -> torch.Tensor:
        """The crops of ``rows`` (device indices, None: all) at ``level`` (an int, or a device tensor per row)."""
        if self.params.device != device:
            self.params = self.params.to(device)  # one copy per run, then views / gathers
        if isinstance(level, int):
            chosen = self.params[:, level - 1]
            return chosen if rows is None else chosen[rows]
        if rows is None:
            rows = torch.arange(len(self.params), device=device)
        return self.params[rows, level - 1]


def classifier_free_eps(
    eps_c: torch.Tensor, eps_u: torch.Tensor, omega: float, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Classifier-free guidance: eps_u + omega * (eps_c - eps_u), and eps_u outside ``mask`` (DSG).

    ``mask`` is [N, 1, H, W] in {0, 1} (or None: everywhere). omega = 1 gives
    the conditional branch, omega = 0 the unconditional one.
    """
    guided = omega * eps_c + (1.0 - omega) * eps_u  # the same sum, exact at omega = 1 and 0
    if mask is None:
        return guided
    return torch.where(mask.to(torch.bool), guided, eps_u)
