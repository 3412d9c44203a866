"""Our KNN and ViM, behind pytorch-ood's ``FeaturesDetector`` interface (``fit_features`` / ``predict_features``).

Every other classifier detector is pytorch-ood's (diffguard_pl/detectors/registry.py). These two are kept because
they measure better than pytorch-ood 0.4.0's on the same features (Fashion-OOD's classifier: 30,600 InD training
features of width 128, 9,643 validation queries; tests/test_baselines.py checks the agreement):

- KNN: distances within 1.3e-8 of exact float64 ones (the normalised bank is kept in float32, the distances computed
  in float64) and the exact AUROC at every k of the grid; pytorch-ood's (scikit-learn's brute search in float32) are
  up to 9e-8 off and swap one InD / OOD pair at k = 1000 (AUROC 2.2e-8 low). The whole grid of k comes from one
  neighbour search (16-18 s for k in {50, ..., 1000} on one thread, against 21 s for pytorch-ood's five searches;
  one k: 2.6 s against 2.9 s); torch, so it runs on the evaluation's device (scikit-learn: on the CPU only).
- ViM: float64 (pytorch-ood fits and scores in float32: the small eigenvalues of the 128 x 128 covariance come out
  up to 5.5% off, the residual subspace for dim = 64 differs by 0.09 in Frobenius norm, scores by up to 0.12, the
  validation AUROC by 1.9e-5); a dim outside [1, D - 1] is an error (pytorch-ood silently uses D // 2).

Scores follow the project convention "higher = more OOD" and are float64; every score of a sample depends on that
sample and the fitted state only.

    knn = distance between f / |f| and the k-th nearest of the normalised InD training features
    vim = alpha * || (f - u) NS || - logsumexp(W f + b)

ViM, for a linear head ``z = W f + b`` (W: [C, D]):

    u     = -pinv(W) b                                 origin where the logits vanish
    Sigma = mean_train (f - u)(f - u)^T                uncentred covariance around u
    NS    = eigenvectors of Sigma past the top ``dim`` (the null-space complement), [D, D - dim]
    alpha = mean_train max_c z_c / mean_train || (f - u) NS ||
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from pytorch_ood.api import FeaturesDetector, ModelNotSetException, RequiresFittingException


KNN_CHUNK_ELEMENTS = 2**25  # at most 256 MiB of float64 candidates per chunk


class _FromFeatures(FeaturesDetector):
    """A detector of penultimate features; ``predict(x)`` runs ``encoder`` (inputs -> features) first, as
    pytorch-ood's detectors do."""

    requires_fit = True
    encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ModelNotSetException("this detector was built without an encoder: score features with "
                                       "predict_features")
        with torch.no_grad():
            return self.predict_features(self.encoder(x))


class KNN(_FromFeatures):
    """Deep nearest neighbours (Sun et al., 2022): the distance of the normalised features to the k-th nearest
    normalised InD training feature."""

    def __init__(self, k: int = 50, chunk_size: int = 256, encoder=None):
        self.k, self.chunk_size, self.encoder = int(k), chunk_size, encoder
        self.bank: Optional[torch.Tensor] = None  # normalised training features [N, D], float32 (float64 if given)

    def fit_features(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> "KNN":
        """Keep the L2-normalised InD training features [N, D] (labels are not used)."""
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
        if not 1 <= self.k <= len(features):
            raise ValueError(f"k={self.k} must lie in [1, {len(features)}] (the InD training features)")
        dtype = torch.promote_types(features.dtype, torch.float32)
        self.bank = F.normalize(features.detach().to(torch.float64), dim=-1).to(dtype)
        return self

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.predict_grid(features, [self.k])[self.k]

    def predict_grid(self, features: torch.Tensor, ks: Sequence[int]) -> Dict[int, torch.Tensor]:
        """The score for every ``k`` in ``ks`` from one search: the top ``max(ks) + 16`` candidates by a similarity
        product in the bank's dtype, their distances recomputed in float64, the k-th smallest for each k (so the
        result hinges neither on the product's rounding nor on tie-breaking)."""
        if self.bank is None:
            raise RequiresFittingException()
        bank = self.bank.to(features.device)
        n_candidates = min(bank.shape[0], max(ks) + 16)
        queries = F.normalize(features.detach().to(torch.float64), dim=-1)
        # The gathered candidates are [rows, M, D] float64: fewer rows per chunk for a large k and D.
        rows = max(1, min(self.chunk_size, KNN_CHUNK_ELEMENTS // max(1, n_candidates * bank.shape[1])))
        out: Dict[int, list] = {k: [] for k in ks}
        for q in queries.split(rows):
            idx = (q.to(bank.dtype) @ bank.T).topk(n_candidates, dim=-1).indices  # [B, M]
            dist = torch.linalg.vector_norm(bank[idx].to(torch.float64) - q[:, None, :], dim=-1).sort(dim=-1).values
            for k in ks:
                out[k].append(dist[:, k - 1])
        return {k: torch.cat(parts) if parts else queries.new_zeros(0) for k, parts in out.items()}


class ViM(_FromFeatures):
    """Virtual-logit matching (Wang et al., 2022) for a linear head, in float64."""

    def __init__(self, head: torch.nn.Linear, dim: int, encoder=None):
        self.encoder = encoder
        self.weight = head.weight.detach().to(torch.float64)
        self.bias = (head.bias.detach() if head.bias is not None else head.weight.new_zeros(len(head.weight))).to(
            torch.float64)
        self.dim = int(dim)
        self.u: Optional[torch.Tensor] = None
        self.ns: Optional[torch.Tensor] = None
        self.alpha: Optional[float] = None

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.to(features.device).T + self.bias.to(features.device)

    def fit_features(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> "ViM":
        """Origin, residual space and logit scale from InD training features [N, D] (labels are not used)."""
        n, d = features.shape
        if self.weight.shape[1] != d:
            raise ValueError(f"features have width {d}, the head takes {self.weight.shape[1]}")
        if not 1 <= self.dim < d:
            raise ValueError(f"dim={self.dim} must lie in [1, {d - 1}] for feature width {d}")
        feats = features.detach().to(torch.float64)
        weight = self.weight.to(feats.device)
        self.u = -torch.linalg.pinv(weight) @ self.bias.to(feats.device)
        centred = feats - self.u
        eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / n)  # ascending eigenvalues
        self.ns = eigvecs[:, torch.argsort(eigvals, descending=True)[self.dim:]].contiguous()
        residual = torch.linalg.vector_norm(centred @ self.ns, dim=-1)
        self.alpha = (self._logits(feats).amax(dim=-1).mean() / residual.mean()).item()
        return self

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.ns is None:
            raise RequiresFittingException()
        feats = features.detach().to(torch.float64)
        residual = torch.linalg.vector_norm((feats - self.u.to(feats.device)) @ self.ns.to(feats.device), dim=-1)
        return self.alpha * residual - torch.logsumexp(self._logits(feats), dim=-1)
