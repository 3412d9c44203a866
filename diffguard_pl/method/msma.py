"""MSMA: multiscale score matching (Mahmood, Oliva, Styner, ICLR 2021), on an eps-prediction DDPM.

The paper's statistic is, per input x, the vector of weighted score norms at L noise levels,

    v(x) = ( || sigma_i * s(x, sigma_i) ||_2 )_{i=1..L}           (the authors' ``compute_weighted_scores``:
                                                                   ``reduce_norm(model([x, i]) * sigma)``, the
                                                                   Euclidean norm over all pixels, no division
                                                                   by the dimension)

and an auxiliary density model fitted on the training vectors scores new inputs by negative log-likelihood
(``train_gmm`` in ``ood_detection_helper.py``: StandardScaler then a full-covariance GaussianMixture, its
number of components picked from 2, 4, ..., 20 by 10-fold cross-validated log-likelihood, refitted on all
training vectors; OOD score = -``score_samples``). Their NCSN levels are geometric,
sigma_i = exp(linspace(log sigma_high, log sigma_low, L)) with sigma_high = 1, sigma_low = 0.01, L = 10 on
images in [0, 1] (``utils.get_sigma_levels`` and the ``--sigma_*`` defaults in ``utils._build_parser``).

On a DDPM, level t stands for x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n (a = alpha_bar). Its VE equivalent
x_t / sqrt(a_t) = x0 + sigma_t n has sigma_t = sqrt((1 - a_t) / a_t), and the score there is
-eps(x_t, t) / sigma_t, so the paper's weighted norm sigma_t * ||score|| is exactly ||eps(x_t, t)||_2: that
is the entry v_t here. As in the usual DDPM adaptation, the input is noised (x0 alone is never what the
denoiser was trained on at t > 0); the noise n of a sample at level t comes from a generator seeded by the
sample's id and t, so v does not depend on the batch, the order of samples or which other levels are asked
for. (The authors' NCSN instead evaluates s(x, sigma_i) at the clean x; ``noised=False`` does the VP
analogue, x_t = sqrt(a_t) x0.) Images in [0, 1] map to model space as 2x - 1, then through the
autoencoder for a latent model (whose latents are the "pixels" of the norm).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from diffguard_pl.method.ddim import alpha_bar, spaced_timesteps
from diffguard_pl.models.diffusion import DiffusionModel
from diffguard_pl.seeding import sample_seed

SALT = 104729  # separates MSMA's noise draws from every other per-sample generator
SIGMA_LOW, SIGMA_HIGH = 0.01, 1.0  # the authors' defaults, on images in [0, 1]
COMPONENTS = tuple(range(2, 21, 2))  # the authors' GridSearchCV range of GMM components
FOLDS = 10  # the authors' cv=10


def default_levels(num_train_timesteps: int, L: int = 10, alphas_cumprod: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """L ascending training timesteps [L] long at which to take the norms.

    With ``alphas_cumprod`` (the model's schedule): the timesteps whose sigma_t = sqrt((1 - a_t) / a_t) lies
    nearest (in log) to the authors' geometric sigmas, SIGMA_LOW..SIGMA_HIGH on [0, 1] images, i.e. twice
    that in model units ([-1, 1]). Without it: L timesteps spread evenly over the schedule, the middles of
    L equal strides (stride // 2, stride // 2 + stride, ...), the usual DDPM adaptation.
    """
    if L < 1:
        raise ValueError(f"L={L}: MSMA needs at least one noise level")
    if alphas_cumprod is None:
        stride = num_train_timesteps // L
        return spaced_timesteps(num_train_timesteps, L, offset=stride // 2)
    if int(alphas_cumprod.shape[0]) != num_train_timesteps:
        raise ValueError(f"alphas_cumprod has {alphas_cumprod.shape[0]} entries, num_train_timesteps is "
                         f"{num_train_timesteps}: pass the model's own schedule")
    a = alphas_cumprod.to(torch.float64)
    log_sigma_t = 0.5 * torch.log((1 - a) / a)
    wanted = torch.linspace(math.log(2 * SIGMA_LOW), math.log(2 * SIGMA_HIGH), L, dtype=torch.float64)
    levels = (log_sigma_t[None, :] - wanted[:, None]).abs().argmin(dim=1)
    if len(torch.unique(levels)) != L:
        raise ValueError(f"{L} geometric sigmas map to only {len(torch.unique(levels))} distinct timesteps of "
                         f"this {num_train_timesteps}-step schedule; ask for fewer levels or pass them explicitly")
    return levels


def unet_evals(levels: Sequence[int] | torch.Tensor) -> int:
    """Denoiser evaluations per image: one per level (L)."""
    return len(levels)


def level_noise(ids: Sequence[str], levels: torch.Tensor, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Noise [N, L, *shape] float64: sample i's noise at timestep t from its own generator, seeded by
    (id, t) and ``seed``, so it does not depend on the batch, the order or the other levels."""
    out = torch.empty(len(ids), len(levels), *shape, dtype=torch.float64)
    for i, sample_id in enumerate(ids):
        for k, t in enumerate(levels.tolist()):
            g = torch.Generator().manual_seed(sample_seed(f"{sample_id}@t{t}", seed + SALT))
            out[i, k] = torch.randn(*shape, generator=g, dtype=torch.float64)
    return out


def check_levels(levels: Sequence[int] | torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """``levels`` as a [L] long tensor of distinct training timesteps; ValueError naming the problem."""
    levels = torch.as_tensor(levels, dtype=torch.long).reshape(-1).cpu()
    if len(levels) == 0 or len(torch.unique(levels)) != len(levels):
        raise ValueError(f"levels must be distinct timesteps, at least one, got {levels.tolist()}")
    if int(levels.min()) < 0 or int(levels.max()) >= num_train_timesteps:
        raise ValueError(f"levels {levels.tolist()} must lie in [0, {num_train_timesteps - 1}]")
    return levels


@torch.no_grad()
def score_norms(diffusion: DiffusionModel, images: torch.Tensor, ids: Sequence[str],
                levels: Sequence[int] | torch.Tensor, seed: int = 0, noised: bool = True,
                rows_per_call: Optional[int] = None) -> torch.Tensor:
    """The MSMA vectors [N, L] float64 on CPU: ||eps(x_t, t)||_2 over all of a sample's model-space values,
    for each of ``levels`` (training timesteps); see the module docstring.

    ``images`` [N, C, H, W] in [0, 1]; ``ids`` one per image (they seed the noise); ``noised=False``: the
    authors' clean-input evaluation, x_t = sqrt(a_t) x0. All N * L rows go through the denoiser together,
    ``rows_per_call`` at a time when given (the norms are the same, up to the denoiser's batch rounding).
    """
    if len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    levels = check_levels(levels, diffusion.num_train_timesteps)
    if len(images) == 0:
        return torch.empty(0, len(levels), dtype=torch.float64)
    device = next(diffusion.unet.parameters()).device
    x0 = diffusion.encode(images.to(device) * 2 - 1)
    n, num_levels, shape = x0.shape[0], len(levels), tuple(x0.shape[1:])
    a = alpha_bar(diffusion.alphas_cumprod, levels).to(device)
    root_a = a.sqrt().to(x0.dtype).view(1, -1, *[1] * len(shape))
    x_t = root_a * x0[:, None]
    if noised:
        root_1ma = (1 - a).sqrt().to(x0.dtype).view(1, -1, *[1] * len(shape))
        x_t = x_t + root_1ma * level_noise(ids, levels, shape, seed).to(device, x0.dtype)
    rows = x_t.reshape(n * num_levels, *shape)
    t = levels.to(device).repeat(n)
    step = rows_per_call or max(len(rows), 1)
    eps = torch.cat([diffusion.eps(rows[s : s + step], t[s : s + step]) for s in range(0, len(rows), step)])
    return eps.reshape(n, num_levels, -1).to(torch.float64).norm(dim=-1).cpu()


class MSMAGMM:
    """The authors' auxiliary model: StandardScaler + full-covariance GaussianMixture on the training vectors.

    The number of components is the one of ``components`` with the highest mean held-out log-likelihood over
    ``folds`` consecutive folds of the training vectors (GridSearchCV's unshuffled KFold, as the authors'
    ``cv=10``); the mixture is then refitted on all of them. ``random_state`` fixes the k-means
    initialisation (the authors left it unset), so a fit is deterministic. :meth:`score` is the negative
    log-likelihood: higher = more OOD.
    """

    def __init__(self, components: Sequence[int] = COMPONENTS, folds: int = FOLDS, random_state: int = 0):
        self.components, self.folds, self.random_state = tuple(components), folds, random_state
        self.pipeline = None
        self.cv_loglik: dict = {}

    @property
    def n_components(self) -> int:
        return int(self._fitted().named_steps["mixture"].n_components)

    def _fitted(self):
        if self.pipeline is None:
            raise RuntimeError("MSMAGMM is not fitted: call fit(train_norms) with the InD training vectors first")
        return self.pipeline

    @staticmethod
    def _array(norms: torch.Tensor | np.ndarray) -> np.ndarray:
        x = np.asarray(norms.cpu() if torch.is_tensor(norms) else norms, dtype=np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ValueError(f"norms must be a finite [N, L] array (score_norms' output), got shape {x.shape}")
        return x

    def fit(self, train_norms: torch.Tensor | np.ndarray) -> "MSMAGMM":
        """Choose the components by cross-validation on ``train_norms`` [N, L] and fit on all of them."""
        from sklearn.mixture import GaussianMixture
        from sklearn.model_selection import GridSearchCV, KFold
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        x = self._array(train_norms)
        folds = min(self.folds, len(x))
        smallest_fold = len(x) - math.ceil(len(x) / folds) if folds > 1 else 0
        candidates = [k for k in self.components if k <= smallest_fold]
        if folds < 2 or not candidates:
            raise ValueError(f"{len(x)} training vectors are too few to cross-validate {self.components} "
                             f"components in {self.folds} folds; fit on more InD training images")
        pipeline = Pipeline([("scaler", StandardScaler()),
                             ("mixture", GaussianMixture(covariance_type="full", random_state=self.random_state))])
        grid = GridSearchCV(pipeline, {"mixture__n_components": candidates}, cv=KFold(folds), n_jobs=1)
        grid.fit(x)
        self.cv_loglik = dict(zip(candidates, grid.cv_results_["mean_test_score"].tolist()))
        self.pipeline = grid.best_estimator_  # GridSearchCV's refit on all of ``x``
        return self

    def score(self, norms: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Negative log-likelihood [N] float64 of vectors ``norms`` [N, L] under the fitted mixture."""
        x = self._array(norms)
        expected = self._fitted().named_steps["scaler"].n_features_in_
        if x.shape[1] != expected:
            raise ValueError(f"norms have {x.shape[1]} levels, the mixture was fitted on {expected}; "
                             f"use the same levels for fit and score")
        return torch.from_numpy(-self.pipeline.score_samples(x))
