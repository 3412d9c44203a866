"""DiffPath (Heng, Thiery & Soh, "Out-of-distribution detection with a single unconditional diffusion model",
NeurIPS 2024): OOD scores from the shape of an input's deterministic DDIM path to noise.

    stats = path_statistics(diffusion, images)          # [N, 6] float64, images [N, C, H, W] in [0, 1]
    gmm = DiffPathGMM().fit(path_statistics(diffusion, ind_train_images))
    scores = gmm.score(stats)                           # [N] float64, higher = more OOD

The path (authors' code, clear-nus/diffpath: ``save_train_statistics.py`` / ``save_test_statistics.py``, which
call improved-diffusion's ``ddim_reverse_sample_loop`` with ``timestep_respacing="ddim10"`` and
``clip_denoised=True``): the input x0 (in [-1, 1], encoded for a latent model) is treated as the first respaced
level t_0 and inverted with eta = 0, each step standing on level k, evaluating eps at t_k, clipping the predicted
x0 to [-1, 1] and re-deriving eps from it, then moving to level k + 1. That is the project's ``released`` ladder
(diffguard_pl/method/ddim.py) with clipping. The n re-derived eps_k (one per step, k = 0 .. n - 1) are recorded;
the last step's output is never read, so the path costs n denoiser evaluations and n - 1 steps.

The six statistics (``eps_sum``, ``eps_sum_sq``, ``eps_sum_cb``, ``deps_dt``, ``deps_dt_sq``, ``deps_dt_cb`` in
their ``eval_6d.py``): with the rate of change d_k = (eps_{k+1} - eps_k) * n (``np.diff(eps, axis=1) *
n_ddim_steps``: a step of 1 / n in time) and sums over steps, channels and pixels,

    sum eps, sum eps^2, sum eps^3, sum d, sum d^2, sum d^3

(raw power sums, not norms or moments). DiffPath-6D (``eval_6d.py``): StandardScaler + GaussianMixture fitted on the
InD training statistics, n_components in {50, 100} and covariance_type in {full, tied, diag, spherical} chosen by
10-fold GridSearchCV on the mixture's mean log-likelihood, max_iter 200, refitted on all of them; the score is
the negative log-likelihood. DiffPath-1D (``eval_1d.py``): a Gaussian KDE, bandwidth 5, on sqrt(sum d^2)
(``deps_dt_sq_sqrt``); the score is its negative log-density.

Nothing here is random: the inversion is deterministic and the mixture's k-means initialisation has a fixed
``random_state`` (the authors left it unset), so no per-sample generator is needed and a sample's statistics
do not depend on its batch, order or id.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from diffguard_pl.method.ddim import Ladder, ddim_step, denoised
from diffguard_pl.models.diffusion import DiffusionModel

STATISTICS = ("eps_sum", "eps_sum_sq", "eps_sum_cb", "deps_dt", "deps_dt_sq", "deps_dt_cb")
KDE_STATISTIC = "deps_dt_sq_sqrt"  # sqrt of deps_dt_sq: the authors' 1-D statistic
COMPONENTS = (50, 100)
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def unet_evals(num_steps: int = 10) -> int:
    """Denoiser evaluations per image of :func:`path_statistics`: one per recorded eps, ``num_steps``."""
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: DiffPath needs at least 2 steps (its rate of change is a "
                         f"difference of consecutive eps); the authors use 10")
    return num_steps


def path_ladder(diffusion: DiffusionModel, num_steps: int = 10) -> Ladder:
    """The inversion's levels: ``num_steps`` evenly spaced timesteps 0, T / n, ... with guided-diffusion's
    respaced alpha_bar table (improved-diffusion's ``ddim<n>`` respacing), the input standing at level 1."""
    unet_evals(num_steps)
    return Ladder.build(diffusion.alphas_cumprod, num_steps, kind="released")


@torch.no_grad()
def path_eps(diffusion: DiffusionModel, x0: torch.Tensor, ladder: Ladder, clip_x0: bool = True):
    """Yield the re-derived eps of each inversion step of model-space ``x0`` along ``ladder`` (released kind),
    as improved-diffusion's ``ddim_reverse_sample`` computes it: eps at the level stood on, x0 prediction clipped
    to [-1, 1] with ``clip_x0`` (their ``clip_denoised``), eps re-derived from it; then the step to the next
    level, skipped after the last eps (its output is not used)."""
    timesteps, *columns = ladder.on(x0.device, x0.dtype)
    shape = (1,) * x0.ndim
    coef = [tuple(c[k].view(shape) for c in columns) for k in range(ladder.num_levels)]
    x = x0
    for level in range(ladder.start, ladder.num_levels):
        predicted = diffusion.eps(x, timesteps[level].expand(len(x)))
        yield denoised(x, predicted, coef[level], clip_x0)[1]
        if level + 1 < ladder.num_levels:
            x = ddim_step(x, predicted, None, None, clip_x0, coef_t=coef[level], coef_s=coef[level + 1])


def _power_sums(v: torch.Tensor) -> torch.Tensor:
    """[N, 3] float64: per-sample sums of v, v^2, v^3 over every non-batch axis."""
    v = v.to(torch.float64).flatten(1)
    return torch.stack([v.sum(1), (v * v).sum(1), (v * v * v).sum(1)], dim=1)


@torch.no_grad()
def path_statistics(diffusion: DiffusionModel, images: torch.Tensor, num_steps: int = 10,
                    clip_x0: bool = True) -> torch.Tensor:
    """The six DiffPath statistics of ``images`` ([N, C, H, W] in [0, 1]): [N, 6] float64 on the CPU, columns
    :data:`STATISTICS` (see the module docstring).

    Runs on ``images``' device in their dtype (the power sums in float64); ``num_steps`` respaced DDIM steps
    (the authors: 10), ``num_steps`` denoiser evaluations per image. The running sums keep one eps per step in
    memory instead of the whole path.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W] in [0, 1], got shape {list(images.shape)}")
    if diffusion.conditional and diffusion.null_class is None:
        raise ValueError("DiffPath runs an unconditional model (or a conditional one with a null class); this "
                         "class-conditional model has none: pass an unconditional diffusion model")
    ladder = path_ladder(diffusion, num_steps)
    x0 = diffusion.encode(images * 2 - 1)
    sums = x0.new_zeros((len(x0), 6), dtype=torch.float64)
    previous: Optional[torch.Tensor] = None
    for eps in path_eps(diffusion, x0, ladder, clip_x0):
        sums[:, :3] += _power_sums(eps)
        if previous is not None:
            sums[:, 3:] += _power_sums((eps.to(torch.float64) - previous) * num_steps)
        previous = eps.to(torch.float64)
    return sums.cpu()


def kde_statistic(stats: torch.Tensor) -> torch.Tensor:
    """[N] float64: the authors' 1-D statistic sqrt(sum (d eps / dt)^2) from :func:`path_statistics`' rows."""
    return _check_stats(stats)[:, STATISTICS.index("deps_dt_sq")].sqrt()


def _check_stats(stats: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(stats) or stats.ndim != 2 or stats.shape[1] != len(STATISTICS):
        raise ValueError(f"expected path_statistics' [N, {len(STATISTICS)}] tensor, got "
                         f"{list(getattr(stats, 'shape', []))}")
    if not torch.isfinite(stats).all():
        raise ValueError("DiffPath statistics contain NaN or Inf: check the diffusion model and the inputs")
    return stats.to(torch.float64).cpu()


class DiffPathGMM:
    """DiffPath-6D: StandardScaler + GaussianMixture on the six statistics of the InD training set.

    :meth:`fit` chooses ``n_components`` x ``covariance_type`` by ``cv``-fold GridSearchCV (unshuffled folds, as
    sklearn's default; the score: the mixture's mean log-likelihood of the held-out fold) and refits the best on
    every row, as ``eval_6d.py``. ``chosen`` (the best parameters) and ``cv_score`` (their mean held-out
    log-likelihood) are set by fit. ``random_state`` fixes the k-means initialisation, so a fit is deterministic.
    """

    def __init__(self, n_components: Sequence[int] = COMPONENTS, covariance_types: Sequence[str] = COVARIANCE_TYPES,
                 cv: int = 10, max_iter: int = 200, random_state: int = 0):
        bad = [c for c in covariance_types if c not in COVARIANCE_TYPES]
        if bad or not covariance_types or not n_components or min(n_components) < 1 or cv < 2:
            raise ValueError(f"DiffPathGMM(n_components={list(n_components)}, covariance_types="
                             f"{list(covariance_types)}, cv={cv}): need components >= 1, covariance types from "
                             f"{COVARIANCE_TYPES} and cv >= 2")
        self.n_components, self.covariance_types = tuple(n_components), tuple(covariance_types)
        self.cv, self.max_iter, self.random_state = cv, max_iter, random_state
        self.model = None
        self.chosen: Optional[dict] = None
        self.cv_score: Optional[float] = None

    def fit(self, train_stats: torch.Tensor) -> "DiffPathGMM":
        """Fit on the InD training statistics [N, 6] (only these); returns self."""
        from sklearn.mixture import GaussianMixture
        from sklearn.model_selection import GridSearchCV
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        x = _check_stats(train_stats).numpy()
        smallest_fold = len(x) - -(-len(x) // self.cv)  # rows a cross-validation fit sees, at the least
        if smallest_fold < max(self.n_components):
            raise ValueError(f"{len(x)} training rows give {self.cv}-fold fits of {smallest_fold} rows, fewer than "
                             f"{max(self.n_components)} mixture components: use more InD training images or pass "
                             f"smaller n_components")
        pipeline = Pipeline([("scaler", StandardScaler()),
                             ("mixture", GaussianMixture(max_iter=self.max_iter, random_state=self.random_state))])
        grid = {"mixture__n_components": list(self.n_components),
                "mixture__covariance_type": list(self.covariance_types)}
        search = GridSearchCV(pipeline, grid, cv=self.cv, n_jobs=1, refit=True).fit(x)
        self.model = search.best_estimator_
        self.chosen = {name.split("__")[1]: value for name, value in search.best_params_.items()}
        self.cv_score = float(search.best_score_)
        return self

    def score(self, stats: torch.Tensor) -> torch.Tensor:
        """[N] float64: the negative log-likelihood of each row under the fitted mixture (higher = more OOD)."""
        if self.model is None:
            raise RuntimeError("DiffPathGMM is not fitted: call fit(train_stats) with the InD training statistics")
        return torch.from_numpy(-self.model.score_samples(_check_stats(stats).numpy()))


class DiffPathKDE:
    """DiffPath-1D: a Gaussian kernel density on :func:`kde_statistic` of the InD training set, with the fixed
    bandwidth of ``eval_1d.py`` (5, in the statistic's units: it was set for 32 x 32 and 64 x 64 RGB images and
    should be re-chosen for other sizes, where the statistic's scale differs)."""

    def __init__(self, bandwidth: float = 5.0):
        if not bandwidth > 0:
            raise ValueError(f"bandwidth={bandwidth} must be positive")
        self.bandwidth = bandwidth
        self.model = None

    def fit(self, train_stats: torch.Tensor) -> "DiffPathKDE":
        """Fit on the InD training statistics [N, 6] (only these); returns self."""
        from sklearn.neighbors import KernelDensity

        values = kde_statistic(train_stats).numpy().reshape(-1, 1)
        self.model = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth).fit(values)
        return self

    def score(self, stats: torch.Tensor) -> torch.Tensor:
        """[N] float64: the negative log-density of each row's statistic (higher = more OOD)."""
        if self.model is None:
            raise RuntimeError("DiffPathKDE is not fitted: call fit(train_stats) with the InD training statistics")
        values = kde_statistic(stats).numpy().reshape(-1, 1)
        return torch.from_numpy(-np.asarray(self.model.score_samples(values), dtype=np.float64))
