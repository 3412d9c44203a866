"""DDPM-OOD (Graham et al., "Denoising diffusion models for out-of-distribution detection", CVPR-W 2023).

An image is noised to several start levels t and denoised back; an input the model has not learned comes back
further from itself. Per start level, with fresh noise eps ~ N(0, I) and a = alpha_bar of the level,

    x_t   = sqrt(a) x_0 + sqrt(1 - a) eps                       (the forward process, closed form)
    x_hat = the sampler's walk from x_t down to the clean level
    mse   = mean over pixels of (x_0 - clamp(x_hat, 0, 1))^2     (images in [0, 1])
    feat  = d(phi(x_0), phi(clamp(x_hat, 0, 1)))                 (the authors' LPIPS; here a caller's phi)

Each error is z-scored per level against InD validation images, and the score is the mean over levels of
the z-scores summed over error kinds (the authors' ``ood_detection.py``: ``z_score_mse +
z_score_perceptual_difference``, then the mean per file over t; mean and std per t from the validation csv,
pandas' sample std).

What follows the authors' code (``src/trainers/reconstruct.py``, ``ood_detection.py``, README of
github.com/marksgraham/ddpm-ood) and what differs:

- start levels: their 100-step PNDM schedule, ascending, ``[1::inference_skip_factor]`` (skip 16: 7 starts
  t = 10, 170, ..., 970; skip 4: 25 starts); :func:`authors_levels` gives the same timesteps as levels of the
  project's spaced ladder;
- the noise is drawn afresh for every start (``torch.randn_like`` inside their loop over t); here from a
  generator seeded by the sample id and the level, so that scores do not depend on batch, order or process;
- sampler: theirs is PLMS over the spaced steps at or below t; here the project's deterministic DDIM
  (eta = 0, no x0 clipping, as PLMS does not clip) on the :class:`~diffguard_pl.method.ddim.Ladder` of
  ``num_steps`` steps: a start at level k walks k steps, k UNet evaluations;
- the reconstruction is clamped to [0, 1] before both errors, as theirs is.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from diffguard_pl.method.ddim import Ladder, ddim_step
from diffguard_pl.method.scores import cosine_distance
from diffguard_pl.models import DiffusionModel
from diffguard_pl.seeding import sample_seed

SALT = 104729  # separates DDPM-OOD's noise from every other per-sample generator
FeatureFn = Callable[[torch.Tensor], torch.Tensor]
DISTANCES = ("cosine", "l2")


def authors_levels(num_steps: int = 100, skip: int = 16) -> list:
    """The authors' start points as levels of a ``num_steps`` ladder (level k: timestep (k - 1) * stride).

    Their start points are ``reversed(timesteps)[1::skip]`` of MONAI Generative's PNDM schedule with
    ``skip_prk_steps`` (timesteps 0, s, 2 s, ..., 99 s for 100 steps): t = s, (1 + skip) s, (1 + 2 skip) s, ...,
    which are levels 2, 2 + skip, 2 + 2 skip, ... (skip 16 of 100: 2, 18, 34, 50, 66, 82, 98, their t = 10,
    170, ..., 970; skip 4: 25 levels, as their README's table says; its 100 and 34 for skips 1 and 3 count one
    more than this schedule gives).
    """
    if num_steps < 2 or skip < 1:
        raise ValueError(f"num_steps={num_steps} (at least 2) and skip={skip} (at least 1) give no start levels")
    return list(range(2, num_steps + 1, skip))


def check_levels(levels: Sequence[int], num_steps: int) -> list:
    """``levels`` as a list of distinct ints in [1, num_steps]; ValueError naming the bad one otherwise."""
    levels = [int(k) for k in levels]
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"levels {levels} must be a non-empty list of distinct spaced levels")
    for k in levels:
        if not 1 <= k <= num_steps:
            raise ValueError(f"start level {k} lies outside [1, {num_steps}]: levels count spaced steps of the "
                             f"num_steps={num_steps} ladder (level k is timestep (k - 1) * stride)")
    return levels


def unet_evals(levels: Sequence[int], num_steps: int) -> int:
    """Denoiser evaluations per image: a reconstruction from level k walks k DDIM steps, so sum(levels).
    As the authors' loop: from t = m s it evaluates the steps t, t - s, ..., 0, m + 1 = k of them (their
    ``ood_detection.py`` prints m per start, counting a DDIM table that starts at timestep 1)."""
    return sum(check_levels(levels, num_steps))


def start_noise(ids: Sequence[str], levels: Sequence[int], shape: Sequence[int], seed: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise [N, L, *shape]: one fresh draw per sample and start level, each from a generator seeded by the
    sample id and the level, so a draw depends on neither the batch nor the other levels asked for."""
    out = torch.empty(len(ids), len(levels), *shape, dtype=torch.float64)
    for i, sample_id in enumerate(ids):
        for j, level in enumerate(levels):
            g = torch.Generator().manual_seed(sample_seed(f"{sample_id}@{int(level)}", seed + SALT))
            out[i, j] = torch.randn(*shape, generator=g, dtype=torch.float64)
    return out.to(dtype)


def feature_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Per-row distance of two [N, D] feature batches: 1 - cosine similarity, or the Euclidean norm."""
    if distance == "cosine":
        return cosine_distance(a, b)
    if distance == "l2":
        return (a - b).norm(dim=1)
    raise ValueError(f"feature distance {distance!r}: choose from {DISTANCES}")


@torch.no_grad()
def reconstructions(diffusion: DiffusionModel, images: torch.Tensor, ids: Sequence[str], levels: Sequence[int],
                    num_steps: int, seed: int = 0) -> torch.Tensor:
    """Reconstructions [N, L, C, H, W] in [0, 1] of ``images`` [N, C, H, W] in [0, 1] from each start level.

    All N * L walks share one batch: the walk goes from the highest level down, and at level k the rows that
    started at k or above take their step together (one UNet call per level, on the rows still walking).
    """
    levels = check_levels(levels, num_steps)
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids for {len(images)} images: pass one id per image")
    n, num = len(images), len(levels)
    x0 = diffusion.encode(images * 2 - 1)
    timesteps, *table = Ladder.build(diffusion.alphas_cumprod, num_steps).on(x0.device, x0.dtype)
    coefs = [c.view(-1, *[1] * (x0.ndim - 1)) for c in table]  # sqrt(a), sqrt(1 - a), ... per level
    noise = start_noise(ids, levels, x0.shape[1:], seed, x0.dtype).to(x0.device).flatten(0, 1)
    start = torch.tensor(levels, device=x0.device).repeat(n)  # row i * L + j: sample i from level j
    x = coefs[0][start] * x0.repeat_interleave(num, dim=0) + coefs[1][start] * noise
    for k in range(max(levels), 0, -1):
        rows = (start >= k).nonzero().squeeze(1)
        t = timesteps[k].expand(len(rows))
        eps = diffusion.eps(x[rows], t)
        x[rows] = ddim_step(x[rows], eps, None, None, coef_t=tuple(c[k] for c in coefs),
                            coef_s=tuple(c[k - 1] for c in coefs))
    out = ((diffusion.decode(x) + 1) / 2).clamp(0, 1)
    return out.view(n, num, *out.shape[1:])


@torch.no_grad()
def reconstruction_errors(diffusion: DiffusionModel, images: torch.Tensor, ids: Sequence[str],
                          levels: Sequence[int], num_steps: int, seed: int = 0,
                          features: Optional[FeatureFn] = None, distance: str = "cosine"
                          ) -> Dict[str, torch.Tensor]:
    """Errors [N, L] (float64, CPU) of the reconstructions from each start level: ``mse`` always, and
    ``feature`` (``distance`` between ``features(images)`` and ``features(reconstruction)``, features
    [N, D]) when ``features`` is given: the authors' pair of MSE and LPIPS, with the caller's features
    standing in for LPIPS."""
    if distance not in DISTANCES:
        raise ValueError(f"feature distance {distance!r}: choose from {DISTANCES}")
    recon = reconstructions(diffusion, images, ids, levels, num_steps, seed)
    n, num = recon.shape[:2]
    diff = (recon - images.unsqueeze(1)).to(torch.float64)
    errors = {"mse": diff.square().flatten(2).mean(2).cpu()}
    if features is not None:
        own = features(images)
        back = features(recon.flatten(0, 1))
        if own.ndim != 2 or back.shape != (n * num, own.shape[1]):
            raise ValueError(f"features must map [N, C, H, W] images to [N, D], got {list(own.shape)} for "
                             f"{n} images")
        own = own.repeat_interleave(num, dim=0)
        errors["feature"] = feature_distance(own, back, distance).view(n, num).to(torch.float64).cpu()
    return errors


class DDPMOODScore:
    """Per-level z-scores against InD validation errors, summed over error kinds and averaged over levels
    (higher = more OOD). Fitted only on the errors handed to :meth:`fit`: per kind and level the mean and the
    sample standard deviation (ddof = 1, pandas' ``std`` as the authors use it)."""

    def __init__(self):
        self.mean: Optional[Dict[str, torch.Tensor]] = None
        self.std: Optional[Dict[str, torch.Tensor]] = None

    def fit(self, errors: Dict[str, torch.Tensor]) -> "DDPMOODScore":
        """Fit on :func:`reconstruction_errors` of InD validation images (at least two)."""
        if not errors:
            raise ValueError("no error kinds to fit: pass reconstruction_errors(...) of InD validation images")
        mean, std = {}, {}
        for kind, value in errors.items():
            value = value.to(torch.float64).cpu()
            if value.ndim != 2 or value.shape[0] < 2:
                raise ValueError(f"{kind} errors must be [N, L] with N >= 2 to fit a std, got {list(value.shape)}")
            mean[kind], std[kind] = value.mean(0), value.std(0, correction=1)
            if not (std[kind] > 0).all():
                raise ValueError(f"{kind} errors have zero spread at some level over the {value.shape[0]} "
                                 f"validation images: fit on more (or varied) InD images")
        self.mean, self.std = mean, std
        return self

    def score(self, errors: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [N] (float64, CPU): mean over levels of the sum over kinds of (error - mean) / std."""
        if self.mean is None:
            raise RuntimeError("DDPMOODScore is not fitted: call fit(errors of InD validation images) first")
        if set(errors) != set(self.mean):
            raise ValueError(f"error kinds {sorted(errors)} differ from the fitted {sorted(self.mean)}: compute "
                             f"them with the same features argument")
        total = 0
        for kind in self.mean:
            value = errors[kind].to(torch.float64).cpu()
            if value.ndim != 2 or value.shape[1] != len(self.mean[kind]):
                raise ValueError(f"{kind} errors must be [N, {len(self.mean[kind])}] (the fitted levels), "
                                 f"got {list(value.shape)}")
            total = total + (value - self.mean[kind]) / self.std[kind]
        return total.mean(1)
