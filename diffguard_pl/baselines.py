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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

Device = Union[str, torch.device]


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


def knn_score(stats: BaselineStats, features: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Distance from each L2-normalised feature to its k-th nearest neighbour in ``stats.knn_bank``, float64.

    Queries are processed ``chunk_size`` at a time. Candidates are picked with a
    similarity matmul in the bank's dtype (top ``k + 16``), then their distances
    are recomputed exactly in float64 and the k-th smallest is returned, so the
    result is accurate and does not hinge on float32 rounding or tie-breaking.
    """
    bank = stats.knn_bank.to(features.device)
    k = stats.knn_k
    n_candidates = min(bank.shape[0], k + 16)
    queries = F.normalize(features.detach().to(torch.float64), dim=-1)
    out = []
    for q in queries.split(chunk_size):
        similarity = q.to(bank.dtype) @ bank.T  # [B, N]
        idx = similarity.topk(n_candidates, dim=-1).indices  # [B, M]
        candidates = bank[idx].to(torch.float64)  # [B, M, D]
        dist = torch.linalg.vector_norm(candidates - q[:, None, :], dim=-1)
        out.append(dist.sort(dim=-1).values[:, k - 1])
    return torch.cat(out) if out else queries.new_zeros(0)


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
