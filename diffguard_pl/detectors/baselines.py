"""Classifier-based OOD detectors from logits and penultimate features.

All scores follow the project convention "higher = more OOD", so the usual
confidence scores are negated:

    msp       = -max_c softmax(z)_c
    ebo       = -T * logsumexp(z / T)                         (energy, T = 1)
    maxlogit  = -max_c z_c
    knn       = || f/|f| - t_(k)/|t_(k)| ||                   (k-th nearest train feature)
    vim       = alpha * || P_NS (f - u) || - logsumexp(z)

with logits ``z`` and features ``f``. KNN (Sun et al., 2022) and ViM (Wang et
al., 2022) are fitted once on InD training features (``fit_baselines``) into a
``BaselineStats``; ``baseline_scores`` then scores any batch. Every score of a
sample depends on that sample and the fitted state only, never on the rest of
its batch. Scores are returned as float64.

ViM, for a linear head ``z = W f + b`` (W: [C, D]):

    u     = -pinv(W) b                                 origin where the logits vanish
    Sigma = mean_train (f - u)(f - u)^T                uncentred covariance around u
    NS    = eigenvectors of Sigma past the top ``dim`` (the null-space complement), [D, D - dim]
    alpha = mean_train max_c z_c / mean_train || (f - u) NS ||

KNN's ``k`` and ViM's ``dim`` are chosen like OpenOOD v1.5 (its automatic parameter search,
``configs/postprocessors/{knn,vim}.yml``) by ``tune_baselines``: the value of a grid with the best
validation AUROC, InD validation samples against OOD validation samples. Test splits are never used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from diffguard_pl.detectors.metrics import auroc

Device = Union[str, torch.device]
LogitsFeatures = Tuple[torch.Tensor, torch.Tensor]  # (logits [B, C], features [B, D]) of a set of samples

OPENOOD_KNN_GRID = (50, 100, 200, 500, 1000)  # OpenOOD v1.5 knn.yml K_list
OPENOOD_VIM_GRID = (256, 1000)  # OpenOOD v1.5 vim.yml dim_list, for ResNet-50's 2048-d features
OPENOOD_FEATURE_DIM = 2048
FIXED_KNN_K = 50  # OpenOOD's default K, used when there is nothing to tune on


# ---------------------------------------------------------------------------
# Logit-only scores


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Negative maximum softmax probability (Hendrycks & Gimpel, 2017), float64."""
    return -torch.softmax(logits.to(torch.float64), dim=-1).amax(dim=-1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Energy score (EBO, Liu et al., 2020): ``-T * logsumexp(logits / T)``, float64."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return -temperature * torch.logsumexp(logits.to(torch.float64) / temperature, dim=-1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Negative maximum logit (Hendrycks et al., 2022), float64."""
    return -logits.to(torch.float64).amax(dim=-1)


# ---------------------------------------------------------------------------
# Fitted state


@dataclass
class BaselineStats:
    """Fitted state of the feature-based detectors.

    ``knn_bank``: L2-normalised InD training features [N, D] (float32 unless the
    training features were float64); ``vim_u`` [D], ``vim_ns`` [D, D - vim_dim]
    and ``vim_alpha`` are float64.
    """

    knn_bank: torch.Tensor
    knn_k: int
    vim_u: torch.Tensor
    vim_ns: torch.Tensor
    vim_alpha: float
    vim_dim: int

    def to(self, device: Device) -> "BaselineStats":
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            knn_bank=self.knn_bank.to(device),
            vim_u=self.vim_u.to(device),
            vim_ns=self.vim_ns.to(device),
        )

    def state_dict(self) -> dict[str, Union[torch.Tensor, int, float]]:
        """Plain tensors (on CPU) and numbers, e.g. for ``torch.save`` or inter-process transfer."""
        return {
            "knn_bank": self.knn_bank.detach().cpu(),
            "knn_k": int(self.knn_k),
            "vim_u": self.vim_u.detach().cpu(),
            "vim_ns": self.vim_ns.detach().cpu(),
            "vim_alpha": float(self.vim_alpha),
            "vim_dim": int(self.vim_dim),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "BaselineStats":
        """Inverse of ``state_dict``."""
        return cls(
            knn_bank=state["knn_bank"],
            knn_k=int(state["knn_k"]),
            vim_u=state["vim_u"],
            vim_ns=state["vim_ns"],
            vim_alpha=float(state["vim_alpha"]),
            vim_dim=int(state["vim_dim"]),
        )


def default_vim_dim(feature_dim: int) -> int:
    """Principal-space size used by the ViM paper: 1000 for D >= 2048, 512 for D >= 768, else D // 2."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return max(1, feature_dim // 2)


def default_vim_grid(feature_dim: int) -> list[int]:
    """ViM's ``dim`` grid for feature width D: OpenOOD's ``{256, 1000}`` where below D.

    When neither is (D <= 256), the same ratios to OpenOOD's width 2048:
    ``{round(D * 256 / 2048), round(D * 1000 / 2048)}`` clipped to ``[1, D - 1]``, deduplicated, ascending.
    """
    if feature_dim < 2:
        raise ValueError(f"ViM needs a feature dimension >= 2, got {feature_dim}")
    grid = [v for v in OPENOOD_VIM_GRID if v < feature_dim]
    if not grid:
        grid = [min(max(round(feature_dim * v / OPENOOD_FEATURE_DIM), 1), feature_dim - 1) for v in OPENOOD_VIM_GRID]
    return sorted(set(grid))


def knn_grid_for_bank(grid: Sequence[int], bank_size: int) -> list[int]:
    """The values ``1 <= k <= N`` of ``grid`` for a bank of N = ``bank_size`` features, ascending; ``[N]`` if none."""
    return sorted({int(k) for k in grid if 1 <= k <= bank_size}) or [bank_size]


def fit_baselines(
    train_features: torch.Tensor,
    train_logits: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: Optional[torch.Tensor],
    knn_k: int = 10,
    vim_dim: Optional[int] = None,
) -> BaselineStats:
    """Fit KNN and ViM on InD training features [N, D], their logits [N, C] and the head (W [C, D], b [C]).

    ``head_bias=None`` means a head without bias. ``vim_dim=None`` picks ``default_vim_dim(D)``.
    """
    if train_features.ndim != 2 or train_logits.ndim != 2:
        raise ValueError(
            f"train_features and train_logits must be 2-D, got shapes "
            f"{tuple(train_features.shape)} and {tuple(train_logits.shape)}"
        )
    n, d = train_features.shape
    c = head_weight.shape[0]
    if train_logits.shape != (n, c) or head_weight.shape != (c, d):
        raise ValueError(
            f"shapes do not fit: train_features {tuple(train_features.shape)}, train_logits "
            f"{tuple(train_logits.shape)}, head_weight {tuple(head_weight.shape)} (expected [C, D])"
        )
    if head_bias is not None and head_bias.shape != (c,):
        raise ValueError(f"head_bias must have shape ({c},), got {tuple(head_bias.shape)}")
    if not 1 <= knn_k <= n:
        raise ValueError(f"knn_k={knn_k} must lie in [1, {n}] (the number of training features)")
    vim_dim = default_vim_dim(d) if vim_dim is None else vim_dim
    if not 1 <= vim_dim < d:
        raise ValueError(f"vim_dim={vim_dim} must lie in [1, {d - 1}] for feature dimension {d}")

    feats = train_features.detach().to(torch.float64)
    bank_dtype = torch.promote_types(train_features.dtype, torch.float32)
    knn_bank = F.normalize(feats, dim=-1).to(bank_dtype)

    # ViM: origin, residual (null) space of the uncentred covariance, logit scale.
    weight = head_weight.detach().to(device=feats.device, dtype=torch.float64)
    bias = weight.new_zeros(c) if head_bias is None else head_bias.detach().to(weight)
    u = -torch.linalg.pinv(weight) @ bias
    centred = feats - u
    cov = centred.T @ centred / n
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    order = torch.argsort(eigvals, descending=True)
    ns = eigvecs[:, order[vim_dim:]].contiguous()
    residual = torch.linalg.vector_norm(centred @ ns, dim=-1)
    max_logits = train_logits.detach().to(torch.float64).amax(dim=-1)
    alpha = (max_logits.mean() / residual.mean()).item()

    return BaselineStats(knn_bank=knn_bank, knn_k=knn_k, vim_u=u, vim_ns=ns, vim_alpha=alpha, vim_dim=vim_dim)


# ---------------------------------------------------------------------------
# Feature-based scores


KNN_CHUNK_ELEMENTS = 2**25  # at most 256 MiB of float64 candidates per chunk in knn_score


def knn_score(stats: BaselineStats, features: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Distance from each L2-normalised feature to its k-th nearest neighbour in ``stats.knn_bank``, float64.

    Queries are processed ``chunk_size`` at a time (fewer when the gathered candidates would exceed
    ``KNN_CHUNK_ELEMENTS`` float64 values). Candidates are picked with a
    similarity matmul in the bank's dtype (top ``k + 16``), then their distances
    are recomputed exactly in float64 and the k-th smallest is returned, so the
    result is accurate and does not hinge on float32 rounding or tie-breaking.
    """
    return knn_scores(stats, features, [stats.knn_k], chunk_size)[stats.knn_k]


def knn_scores(stats: BaselineStats, features: torch.Tensor, ks: Sequence[int],
               chunk_size: int = 256) -> dict[int, torch.Tensor]:
    """:func:`knn_score` for every ``k`` in ``ks`` from one search (top ``max(ks) + 16`` candidates): the k-th
    smallest exact distance, for each k."""
    bank = stats.knn_bank.to(features.device)
    n_candidates = min(bank.shape[0], max(ks) + 16)
    queries = F.normalize(features.detach().to(torch.float64), dim=-1)
    # The gathered candidates are [rows, M, D] float64: fewer rows per chunk for a large k and D.
    rows = max(1, min(chunk_size, KNN_CHUNK_ELEMENTS // max(1, n_candidates * bank.shape[1])))
    out: dict[int, list] = {k: [] for k in ks}
    for q in queries.split(rows):
        similarity = q.to(bank.dtype) @ bank.T  # [B, N]
        idx = similarity.topk(n_candidates, dim=-1).indices  # [B, M]
        candidates = bank[idx].to(torch.float64)  # [B, M, D]
        dist = torch.linalg.vector_norm(candidates - q[:, None, :], dim=-1).sort(dim=-1).values
        for k in ks:
            out[k].append(dist[:, k - 1])
    return {k: torch.cat(parts) if parts else queries.new_zeros(0) for k, parts in out.items()}


def vim_score(stats: BaselineStats, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """ViM: ``alpha * ||(f - u) NS|| - logsumexp(logits)``, float64 (higher = more OOD)."""
    u = stats.vim_u.to(features.device)
    ns = stats.vim_ns.to(features.device)
    residual = torch.linalg.vector_norm((features.detach().to(torch.float64) - u) @ ns, dim=-1)
    return stats.vim_alpha * residual - torch.logsumexp(logits.detach().to(torch.float64), dim=-1)


def baseline_scores(
    stats: BaselineStats, logits: torch.Tensor, features: torch.Tensor, knn_chunk_size: int = 256
) -> dict[str, torch.Tensor]:
    """All baseline OOD scores for a batch of logits [B, C] and features [B, D] (float64, higher = more OOD)."""
    if logits.ndim != 2 or features.ndim != 2 or logits.shape[0] != features.shape[0]:
        raise ValueError(
            f"expected logits [B, C] and features [B, D], got {tuple(logits.shape)} and {tuple(features.shape)}"
        )
    if features.shape[1] != stats.knn_bank.shape[1]:
        raise ValueError(f"features have dimension {features.shape[1]}, the stats {stats.knn_bank.shape[1]}")
    logits = logits.detach()
    return {
        "msp": msp(logits),
        "ebo": energy(logits),
        "maxlogit": max_logit(logits),
        "knn": knn_score(stats, features, knn_chunk_size),
        "vim": vim_score(stats, logits, features),
    }


# ---------------------------------------------------------------------------
# Choosing KNN's k and ViM's dim on validation data (OpenOOD v1.5's parameter search)


def _rows(pair: Optional[LogitsFeatures], name: str, c: int, d: int) -> int:
    """Number of samples in a (logits [B, C], features [B, D]) pair; 0 for None."""
    if pair is None:
        return 0
    logits, features = pair
    if logits.ndim != 2 or features.ndim != 2 or logits.shape[0] != features.shape[0] \
            or (logits.shape[0] and (logits.shape[1] != c or features.shape[1] != d)):
        raise ValueError(f"{name} must be (logits [B, {c}], features [B, {d}]), "
                         f"got {tuple(logits.shape)} and {tuple(features.shape)}")
    return int(logits.shape[0])


def _best(val_auroc: dict[int, float]) -> int:
    """The value with the highest AUROC; ties go to the smaller value."""
    return max(sorted(val_auroc), key=lambda v: (val_auroc[v], -v))


def tune_baselines(
    train_features: torch.Tensor,
    train_logits: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: Optional[torch.Tensor],
    val_ind: Optional[LogitsFeatures] = None,
    val_ood: Optional[LogitsFeatures] = None,
    knn_grid: Sequence[int] = OPENOOD_KNN_GRID,
    vim_grid: Optional[Sequence[int]] = None,
    knn_k: Optional[int] = None,
    vim_dim: Optional[int] = None,
    knn_chunk_size: int = 256,
) -> tuple[BaselineStats, dict]:
    """``fit_baselines`` with KNN's ``k`` and ViM's ``dim`` chosen on validation data, and a record of the choice.

    ``val_ind`` / ``val_ood``: (logits, features) of InD validation samples and of the pooled OOD validation
    samples. For every grid value ``v`` the detector scores both sets and
    ``AUROC_v = auroc(score(val_ind), score(val_ood))``; the chosen value is ``argmax_v AUROC_v``, ties to
    the smaller ``v``. ``knn_grid`` values above the bank size N are dropped (none left: ``[N]``);
    ``vim_grid=None`` is ``default_vim_grid(D)``, values outside ``[1, D - 1]`` are dropped.

    ``knn_k`` / ``vim_dim`` given: that value is used ("fixed by config"). Without InD or OOD validation
    samples nothing is tuned: ``k = min(50, N)`` and ``dim = default_vim_dim(D)`` ("fixed values").
    The returned ``choice`` holds, per detector, the value, the reason, the candidates and the validation
    AUROC of every candidate evaluated (keys as strings, as they appear in results.json).
    """
    if train_features.ndim != 2 or head_weight.ndim != 2:
        raise ValueError(f"train_features [N, D] and head_weight [C, D] must be 2-D, got shapes "
                         f"{tuple(train_features.shape)} and {tuple(head_weight.shape)}")
    n, d = train_features.shape
    c = head_weight.shape[0]
    n_ind, n_ood = _rows(val_ind, "val_ind", c, d), _rows(val_ood, "val_ood", c, d)
    if knn_k is not None and not 1 <= knn_k <= n:
        raise ValueError(f"baselines.knn_k={knn_k} must lie in [1, {n}] (the InD training features KNN searches): "
                         f"lower it, raise baselines.train_samples, or set null to tune it")
    if vim_dim is not None and not 1 <= vim_dim < d:
        raise ValueError(f"baselines.vim_dim={vim_dim} must lie in [1, {d - 1}] for feature dimension {d}: "
                         f"lower it, or set null to tune it")
    missing = [name for name, count in (("InD", n_ind), ("OOD", n_ood)) if count == 0]
    untuned = f"no {' or '.join(missing)} validation data: fixed values" if missing else None
    tuned = "best validation AUROC (InD val vs pooled OOD val), ties to the smaller value"

    if knn_k is not None:
        knn_candidates, knn_reason, knn_dropped = [knn_k], "fixed by config (baselines.knn_k)", []
    elif untuned:
        knn_candidates, knn_reason, knn_dropped = [min(FIXED_KNN_K, n)], untuned, []
    else:
        knn_candidates, knn_reason = knn_grid_for_bank(knn_grid, n), tuned
        knn_dropped = sorted({int(k) for k in knn_grid} - set(knn_candidates))
    if vim_dim is not None:
        vim_candidates, vim_reason, vim_dropped = [vim_dim], "fixed by config (baselines.vim_dim)", []
    elif untuned:
        vim_candidates, vim_reason, vim_dropped = [default_vim_dim(d)], untuned, []
    else:
        requested = default_vim_grid(d) if vim_grid is None else sorted({int(v) for v in vim_grid})
        vim_candidates, vim_reason = [v for v in requested if 1 <= v < d], tuned
        vim_dropped = [v for v in requested if v not in vim_candidates]
        if not vim_candidates:
            raise ValueError(f"baselines.vim_dim_grid={list(vim_grid or [])} has no value in [1, {d - 1}] for "
                             f"feature dimension {d}: give smaller values, or null for the default grid")

    fits = {dim: fit_baselines(train_features, train_logits, head_weight, head_bias, knn_k=knn_candidates[0],
                               vim_dim=dim) for dim in vim_candidates}
    knn_auroc: dict[int, float] = {}
    vim_auroc: dict[int, float] = {}
    if not missing:
        stats = fits[vim_candidates[0]]  # one search per set serves every k of the grid
        ind, ood = (knn_scores(stats, val[1], knn_candidates, knn_chunk_size) for val in (val_ind, val_ood))
        knn_auroc = {k: auroc(ind[k].cpu(), ood[k].cpu()) for k in knn_candidates}
        for dim, fitted in fits.items():
            vim_auroc[dim] = _auroc_of(lambda lo, fe: vim_score(fitted, lo, fe), val_ind, val_ood)
    best_k = _best(knn_auroc) if knn_auroc else knn_candidates[0]
    best_dim = _best(vim_auroc) if vim_auroc else vim_candidates[0]
    stats = dataclasses.replace(fits[best_dim], knn_k=best_k)
    choice = {
        "knn": {"k": best_k, "reason": knn_reason, "grid": knn_candidates, "dropped": knn_dropped,
                "val_auroc": {str(k): a for k, a in knn_auroc.items()}},
        "vim": {"dim": best_dim, "reason": vim_reason, "grid": vim_candidates, "dropped": vim_dropped,
                "val_auroc": {str(v): a for v, a in vim_auroc.items()}},
        "validation": {"ind": n_ind, "ood": n_ood},
    }
    return stats, choice


def _auroc_of(score, val_ind: LogitsFeatures, val_ood: LogitsFeatures) -> float:
    """AUROC of ``score(logits, features)`` on InD vs OOD validation samples (higher score = more OOD)."""
    return auroc(score(*val_ind).cpu(), score(*val_ood).cpu())
