"""Deterministic DDIM (eta = 0): the one step that both inversion and synthesis take.

With a = alpha_bar (cumulative product), a step from level t to level s is

    x0_pred = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_s     = sqrt(a_s) * x0_pred + sqrt(1 - a_s) * eps

Synthesis walks s < t (towards the image), inversion walks s > t (towards
noise) with the eps predicted at x_t, which is the paper's Eq. 6. Level -1
means the clean image (a = 1). All functions work on batches with one level
per sample.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def spaced_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """``num_steps`` evenly strided training timesteps, ascending: 0, k, 2k, ... (k = T // n)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {num_train_timesteps}]")
    stride = num_train_timesteps // num_steps
    return torch.arange(num_steps, dtype=torch.long) * stride


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at levels ``t`` (level -1 = clean, alpha_bar = 1), as a float64 tensor."""
    padded = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod.to(torch.float64)])
    return padded.to(t.device)[t + 1]


Coefficients = Tuple[torch.Tensor, torch.Tensor]  # (sqrt(a), sqrt(1 - a)), see step_coefficients


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def step_coefficients(a: torch.Tensor, like: torch.Tensor) -> Coefficients:
    """(sqrt(a), sqrt(1 - a)) of alpha_bar ``a`` (float64, one per sample or one for all), in ``like``'s dtype
    and shaped to broadcast over its rows.

    Computed in float64 and rounded once, so a table of them built once per run (as the pipeline does)
    gives bit for bit the numbers a step computes from ``a``.
    """
    return _bcast(a.sqrt(), like), _bcast((1 - a).sqrt(), like)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor,
               coef_t: Optional[Coefficients] = None) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); ``coef_t`` = step_coefficients(a_t, x_t) when precomputed."""
    root_a, root_1ma = coef_t if coef_t is not None else step_coefficients(a_t, x_t)
    return (x_t - root_1ma * eps) / root_a


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, a_t: Optional[torch.Tensor], a_s: Optional[torch.Tensor],
    clip_x0: bool = False, coef_t: Optional[Coefficients] = None, coef_s: Optional[Coefficients] = None,
) -> torch.Tensor:
    """Move ``x_t`` from level alpha_bar ``a_t`` to ``a_s`` (per sample), deterministically.

    ``coef_t`` / ``coef_s``: the levels' :func:`step_coefficients` when precomputed (then ``a_t`` / ``a_s``
    may be None); the result is the same to the bit.

    ``clip_x0`` clips the predicted x0 to [-1, 1] and re-derives eps from it
    (guided-diffusion's ``clip_denoised``): cleaner samples, but the step is
    then no longer exactly invertible.
    """
    root_a_t, root_1ma_t = coef_t if coef_t is not None else step_coefficients(a_t, x_t)
    root_a_s, root_1ma_s = coef_s if coef_s is not None else step_coefficients(a_s, x_t)
    x0 = (x_t - root_1ma_t * eps) / root_a_t
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        # sqrt(1 - a_t) floored at 1e-10 (= sqrt(1e-20)) for the clean level, where eps is not predicted.
        derived = (x_t - root_a_t * x0) / root_1ma_t.clamp_min(1e-10)
        eps = torch.where(root_1ma_t > 0, derived, eps)
    return root_a_s * x0 + root_1ma_s * eps


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    alphas_cumprod: torch.Tensor,
    x_T: torch.Tensor,
    timesteps: torch.Tensor,
    progress: Optional[Callable] = None,
    clip_x0: bool = False,
) -> torch.Tensor:
    """Synthesis from pure noise ``x_T`` at ``timesteps[-1]`` down to the clean level.

    ``eps_fn(x, t)`` returns the (possibly guided) noise prediction for a batch
    at per-sample timesteps ``t``.
    """
    x = x_T
    levels = torch.cat([torch.tensor([-1]), timesteps.cpu()])
    steps = range(len(timesteps), 0, -1)
    for i in progress(steps) if progress else steps:
        t = torch.full((x.shape[0],), int(levels[i]), dtype=torch.long, device=x.device)
        s = torch.full_like(t, int(levels[i - 1]))
        x = ddim_step(x, eps_fn(x, t), alpha_bar(alphas_cumprod, t), alpha_bar(alphas_cumprod, s), clip_x0)
    return x
