"""Deterministic DDIM (eta = 0): the step that inversion and synthesis take, and the ladder of levels they walk.

With a = alpha_bar (cumulative product), a step from level t to level s is

    x0_pred = sqrt(1 / a_t) * x_t - sqrt(1 / a_t - 1) * eps
    x_s     = sqrt(a_s) * x0_pred + sqrt(1 - a_s) * eps

(the arithmetic in guided-diffusion's order and from its four float64 tables, so a float64 run reproduces its
loop to rounding).

Synthesis walks towards the image, inversion towards noise with the eps
predicted at x_t (the paper's Eq. 6). Clipping (guided-diffusion's
``clip_denoised``) clips x0_pred to [-1, 1] and re-derives eps from it,
eps = (sqrt(1 / a_t) x_t - x0) / sqrt(1 / a_t - 1), before the step.

Levels (:class:`Ladder`): level 0 is the clean image (a = 1); level k >= 1 is
the k-th spaced timestep t_{k-1} = (k - 1) * stride + offset. Two ladders:

- ``symmetric``: the input sits at level 0; inversion step k goes from level
  k - 1 to k with eps evaluated at the timestep of level k, and synthesis step
  from level k to k - 1 evaluates eps at level k: both directions use the same
  timestep for the same pair of levels. Depth d reaches t_{d-1}. (This is also
  how latent-diffusion's DDIM inversion pairs them.)
- ``released``: guided-diffusion's ``ddim_reverse_sample``, as the released
  DiffGuard code runs it: the input is *treated as* level 1 (timestep t_0, with
  that level's alpha_bar), and each inversion step from level k to k + 1 uses
  eps at the timestep of level k, the level it stands on. Depth d reaches t_d
  (100 spaced steps, depth 90: t = 900). Synthesis is the same as above and
  ends at level 0, one step more than the inversion took. Its alpha_bar table is
  guided-diffusion's respaced one (:func:`respaced_alpha_bar`).

Synthesis starts at the level the inversion reached (``handoff: exact``); the
released code started one level above it (``handoff: released``, a switch for
exact reproduction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Coefficients = Tuple[torch.Tensor, ...]  # (sqrt(a), sqrt(1 - a), sqrt(1 / a), sqrt(1 / a - 1)): step_coefficients
LADDERS = ("symmetric", "released")
HANDOFFS = ("exact", "released")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, offset: int = 0) -> torch.Tensor:
    """``num_steps`` evenly strided training timesteps, ascending: offset, offset + k, ... (k = T // n)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {num_train_timesteps}]")
    stride = num_train_timesteps // num_steps
    steps = torch.arange(num_steps, dtype=torch.long) * stride + offset
    if offset < 0 or int(steps[-1]) >= num_train_timesteps:
        raise ValueError(f"timestep offset {offset} takes the last of {num_steps} steps past {num_train_timesteps - 1}")
    return steps


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at timesteps ``t`` (timestep -1 = clean, alpha_bar = 1), as a float64 tensor."""
    padded = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod.to(torch.float64)])
    return padded.to(t.device)[t + 1]


def respaced_alpha_bar(spaced: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's ``SpacedDiffusion`` table: the betas of the kept timesteps, 1 - a_i / a_{i-1}, then
    their cumulative product again, in float64 (equal to ``spaced`` up to rounding, which a float64 run of the
    released recipe would otherwise carry into the last digits of its scores)."""
    import numpy as np

    values, last, betas = spaced.to(torch.float64).tolist(), 1.0, []
    for a in values:
        betas.append(1 - a / last)
        last = a
    return torch.from_numpy(np.cumprod(1.0 - np.array(betas, dtype=np.float64)))


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def coefficient_table(a: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """(sqrt(a), sqrt(1 - a), sqrt(1 / a), sqrt(1 / a - 1)) of float64 alpha_bar ``a``, in float64: the four
    numbers a step reads (guided-diffusion keeps the same four tables)."""
    a = a.to(torch.float64)
    return a.sqrt(), (1 - a).sqrt(), (1 / a).sqrt(), (1 / a - 1).sqrt()


def step_coefficients(a: torch.Tensor, like: torch.Tensor) -> Coefficients:
    """:func:`coefficient_table` of alpha_bar ``a`` (float64, one per sample or one for all), in ``like``'s
    dtype and shaped to broadcast over its rows.

    Computed in float64 and rounded once, so a table of them built once per run (as :class:`Ladder` does)
    gives bit for bit the numbers a step computes from ``a``.
    """
    return tuple(_bcast(c, like) for c in coefficient_table(a))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t: Optional[torch.Tensor],
               coef_t: Optional[Coefficients] = None) -> torch.Tensor:
    """x0 = sqrt(1 / a_t) x_t - sqrt(1 / a_t - 1) eps (guided-diffusion's order of the arithmetic);
    ``coef_t`` = step_coefficients(a_t, x_t) when precomputed."""
    _, _, recip, recip_m1 = coef_t if coef_t is not None else step_coefficients(a_t, x_t)
    return x_t * recip - recip_m1 * eps


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, coef_t: Coefficients,
                at_clean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """eps = (sqrt(1 / a_t) x_t - x0) / sqrt(1 / a_t - 1): the noise that a given x0 implies. At the clean level
    (a_t = 1) no noise is implied: there the result is ``at_clean`` (required if a row may be at that level)."""
    _, _, recip, recip_m1 = coef_t
    if at_clean is None:
        return (x_t * recip - x0) / recip_m1
    # sqrt(1 / a_t - 1) floored at 1e-10 where it is 0, so that the discarded branch stays finite
    return torch.where(recip_m1 > 0, (x_t * recip - x0) / recip_m1.clamp_min(1e-10), at_clean)


def denoised(x_t: torch.Tensor, eps: torch.Tensor, coef_t: Coefficients, clip_x0: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) of ``x_t`` as guided-diffusion's ``p_mean_variance`` gives them: x0 predicted from ``eps``,
    clipped to [-1, 1] with ``clip_x0`` (its ``clip_denoised``), and eps re-derived from that x0 (a no-op up to
    rounding without clipping; at the clean level, a_t = 1, ``eps`` is kept). The one home of x0 clipping."""
    x0 = predict_x0(x_t, eps, None, coef_t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    return x0, eps_from_x0(x_t, x0, coef_t, at_clean=eps)


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, a_t: Optional[torch.Tensor], a_s: Optional[torch.Tensor],
    clip_x0: bool = False, coef_t: Optional[Coefficients] = None, coef_s: Optional[Coefficients] = None,
) -> torch.Tensor:
    """Move ``x_t`` from level alpha_bar ``a_t`` to ``a_s`` (per sample), deterministically.

    ``coef_t`` / ``coef_s``: the levels' :func:`step_coefficients` when precomputed (then ``a_t`` / ``a_s``
    may be None); the result is the same to the bit.

    As guided-diffusion's ``ddim_sample`` / ``ddim_reverse_sample``: from :func:`denoised` (x0 clipped with
    ``clip_x0``: cleaner samples, but the step is then no longer exactly invertible).
    """
    coef_t = coef_t if coef_t is not None else step_coefficients(a_t, x_t)
    root_a_s, root_1ma_s = (coef_s if coef_s is not None else step_coefficients(a_s, x_t))[:2]
    x0, eps = denoised(x_t, eps, coef_t, clip_x0)
    return x0 * root_a_s + root_1ma_s * eps


@dataclass
class Ladder:
    """The levels of one configuration (see the module docstring), with their timesteps and coefficients.

    ``timesteps[k]`` / ``alphas[k]``: the denoiser timestep and alpha_bar of level k (level 0: -1 and 1).
    Built once; :meth:`on` gives the device tables a run reads, so no step computes a square root.
    """

    timesteps: torch.Tensor  # [levels] long, CPU
    alphas: torch.Tensor  # [levels] float64, CPU
    kind: str = "symmetric"
    handoff: str = "exact"
    _tables: Dict[tuple, tuple] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, alphas_cumprod: torch.Tensor, num_steps: int, kind: str = "symmetric", handoff: str = "exact",
              offset: int = 0) -> "Ladder":
        if kind not in LADDERS or handoff not in HANDOFFS:
            raise ValueError(f"ladder {kind!r} / handoff {handoff!r}: choose from {LADDERS} / {HANDOFFS}")
        steps = spaced_timesteps(int(alphas_cumprod.shape[0]), num_steps, offset)
        timesteps = torch.cat([torch.tensor([-1]), steps])
        alphas = alpha_bar(alphas_cumprod.cpu(), timesteps)
        if kind == "released":
            alphas[1:] = respaced_alpha_bar(alphas[1:])
        return cls(timesteps, alphas, kind, handoff)

    @property
    def num_levels(self) -> int:
        return len(self.timesteps)

    @property
    def start(self) -> int:
        """The level the input is treated as: 0 (symmetric) or 1 (released)."""
        return 0 if self.kind == "symmetric" else 1

    def reached(self, depth: Union[int, torch.Tensor]):
        """The level after ``depth`` inversion steps."""
        return self.start + depth

    def synthesis_start(self, depth: Union[int, torch.Tensor]):
        """The level synthesis starts from after ``depth`` inversion steps (one above with the released handoff);
        also the number of synthesis steps (they end at level 0)."""
        return self.reached(depth) + (1 if self.handoff == "released" else 0)

    def unet_evals(self, depth: Union[int, torch.Tensor], rows_per_step: int):
        """Denoiser evaluations of a walk: ``depth`` inversion steps, then ``rows_per_step`` rows per synthesis
        step (the guided row, its unconditional twin with classifier-free guidance, the unguided reference)."""
        return depth + self.synthesis_start(depth) * rows_per_step

    def inversion_eps_level(self, level: int) -> int:
        """The level whose timestep the inversion step from ``level`` evaluates eps at."""
        return level + 1 if self.kind == "symmetric" else level

    def steps(self, depth: int) -> list:
        """(input level, eps timestep, output level) of every inversion step, then every synthesis step."""
        inversion = [(k, int(self.timesteps[self.inversion_eps_level(k)]), k + 1)
                     for k in range(self.start, self.reached(depth))]
        synthesis = [(k, int(self.timesteps[k]), k - 1) for k in range(self.synthesis_start(depth), 0, -1)]
        return inversion + synthesis

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """(timesteps [levels] long, then the four :func:`coefficient_table` columns [levels]) on ``device``, in
        ``dtype``; cached."""
        key = (device, dtype)
        if key not in self._tables:
            columns = (c.to(device=device, dtype=dtype) for c in coefficient_table(self.alphas))
            self._tables[key] = (self.timesteps.to(device), *columns)
        return self._tables[key]


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
