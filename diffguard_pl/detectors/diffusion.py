"""The diffusion detectors (DDPM-OOD, LMD, DiffPath, MSMA) as configured detectors: statistics, head, cost.

    detector = DiffusionDetector("diffpath", params, diffusion)            # registry defaults + params
    detector.fit(detector.statistics(train_images, train_ids))             # InD training images only
    scores = detector.score(detector.statistics(images, ids))              # [N] float64, higher = more OOD

Each detector is two parts: :meth:`DiffusionDetector.statistics`, what the diffusion model says of an image (a
dict of per-sample tensors: DDPM-OOD's error per start level, LMD's median distances, DiffPath's six path
statistics, MSMA's noise norms; the cores are in diffguard_pl/method/), and a head fitted on InD images that maps
them to one score (DDPM-OOD: per-level z-scores on InD validation; DiffPath, MSMA: a Gaussian mixture on InD
training statistics; LMD: none). What each is fitted on is the registry's ``fit_on``
(diffguard_pl/detectors/registry.py); per-sample randomness is seeded from the sample's id, so statistics do not
depend on batch, order or process.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from diffguard_pl.detectors import registry
from diffguard_pl.method import ddpm_ood, diffpath, lmd, msma
from diffguard_pl.models import DiffusionModel

Statistics = Dict[str, torch.Tensor]  # kind -> [N] or [N, K] float64 on the CPU
Features = Callable[[torch.Tensor], torch.Tensor]  # images [N, C, H, W] in [0, 1] -> [N, D]

# the parameter that makes a detector read the classifier's features, and its values (the first: it does not)
FEATURE_CHOICES = {d.name: (key, tuple(values)) for d in registry.DIFFUSION_DETECTORS
                   for key, values in d.choices.items()}


class DiffusionDetector:
    """One diffusion detector with complete params (:func:`registry.diffusion_params`) on one diffusion model.

    ``features``: the classifier's penultimate features (images -> [N, D]), needed by DDPM-OOD with
    ``features=classifier`` and LMD with ``distance=features`` (the authors' LPIPS stands in as such). ``seed``:
    what the per-sample generators add to the sample id.
    """

    def __init__(self, name: str, params: Mapping, diffusion: DiffusionModel, features: Optional[Features] = None,
                 seed: int = 0):
        self.entry = registry.diffusion_detector(name)
        self.name, self.params = name, registry.diffusion_params(name, params)
        self.diffusion, self.seed = diffusion, seed
        if name in FEATURE_CHOICES:
            key, choices = FEATURE_CHOICES[name]
            if self.params[key] not in choices:
                raise ValueError(f"diffusion_detectors.params.{name}.{key}={self.params[key]!r}: choose from "
                                 f"{list(choices)}")
            if self.params[key] != choices[0] and features is None:
                raise ValueError(f"{name} with {key}={self.params[key]} needs the classifier's features: pass "
                                 f"classifier= to diffguard_pl.api.DiffusionBaseline (features= here), or run it "
                                 f"in evaluate.py")
        self.features = features if name in FEATURE_CHOICES and self.params[FEATURE_CHOICES[name][0]] != \
            FEATURE_CHOICES[name][1][0] else None
        self.head = None
        self.fit_seconds: Optional[float] = None
        self.unet_evals_per_image()  # a bad parameter fails here, not after the first batch

    @property
    def fit_on(self) -> str:
        return self.entry.fit_on

    def unet_evals_per_image(self) -> int:
        """UNet evaluations per image; ValueError naming a parameter the detector cannot run with."""
        p = self.params
        if self.name == registry.MSMA:
            return len(self.msma_levels())
        if self.name == registry.DDPM_OOD and not registry.ddpm_ood_levels(p):
            raise ValueError(f"num_steps={p['num_steps']} with skip={p['skip']} gives no start level (levels 2, "
                             f"2 + skip, ... up to num_steps): use num_steps >= 2")
        if self.name in (registry.DIFFPATH, registry.DIFFPATH_1D):
            diffpath.unet_evals(int(p["num_steps"]))  # at least 2 steps
        if self.name == registry.LMD:  # both kinds of square in the masks, at least one repetition
            lmd.checkerboard_masks(self.diffusion.sample_size, self._lmd_square(), int(p["repetitions"]))
        return self.entry.cost(p)

    def _lmd_square(self) -> int:
        return max(1, self.diffusion.sample_size // int(self.params["blocks"]))

    # ------------------------------------------------------------------------------------------- statistics
    def msma_levels(self) -> torch.Tensor:
        d = self.diffusion
        return msma.default_levels(d.num_train_timesteps, int(self.params["levels"]), d.alphas_cumprod)

    def statistics_key(self) -> tuple:
        """What the statistics depend on besides the model and the images (detectors with equal keys share them)."""
        p = self.params
        if self.name in (registry.DIFFPATH, registry.DIFFPATH_1D):
            return (registry.DIFFPATH, int(p["num_steps"]))
        if self.name == registry.MSMA:
            return (self.name, tuple(self.msma_levels().tolist()), self.seed)
        return (self.name, tuple(sorted(p.items())), self.seed)

    def statistics(self, images: torch.Tensor, ids: Sequence[str]) -> Statistics:
        """What the diffusion model says of ``images`` ([N, C, H, W] in [0, 1], on the model's device), one entry
        per kind (float64, CPU): the input of :meth:`fit` and :meth:`score`."""
        p, d = self.params, self.diffusion
        if self.name == registry.DDPM_OOD:
            levels = registry.ddpm_ood_levels(p)
            return ddpm_ood.reconstruction_errors(d, images, ids, levels, int(p["num_steps"]), self.seed,
                                                  features=self.features)
        if self.name == registry.LMD:
            return lmd.lmd_scores(d, images, ids, int(p["repetitions"]), int(p["num_steps"]), self._lmd_square(),
                                  self.seed, features=self.features)
        if self.name in (registry.DIFFPATH, registry.DIFFPATH_1D):
            return {"path": diffpath.path_statistics(d, images, int(p["num_steps"]))}
        if self.name == registry.MSMA:
            return {"norms": msma.score_norms(d, images, ids, self.msma_levels(), self.seed)}
        raise AssertionError(self.name)

    # ------------------------------------------------------------------------------------------------ head
    def fit(self, statistics: Statistics) -> "DiffusionDetector":
        """Fit the head on the statistics of InD images (training images, or validation images for DDPM-OOD:
        :attr:`fit_on`); LMD has nothing to fit."""
        started = time.perf_counter()
        if self.name == registry.DDPM_OOD:
            self.head = ddpm_ood.DDPMOODScore().fit(statistics)
        elif self.name == registry.DIFFPATH:
            self.head = diffpath.DiffPathGMM().fit(statistics["path"])
        elif self.name == registry.DIFFPATH_1D:
            self.head = diffpath.DiffPathKDE(float(self.params["bandwidth"])).fit(statistics["path"])
        elif self.name == registry.MSMA:
            self.head = msma.MSMAGMM().fit(statistics["norms"])
        self.fit_seconds = time.perf_counter() - started
        return self

    @property
    def needs_fit(self) -> bool:
        return self.fit_on != registry.FIT_NONE

    def score(self, statistics: Statistics) -> torch.Tensor:
        """[N] float64 scores (higher = more OOD) from :meth:`statistics`."""
        if self.name == registry.LMD:
            return statistics[self.params["distance"]]
        if self.head is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit() on the statistics of {self.fit_on} first")
        if self.name == registry.DDPM_OOD:
            return self.head.score(statistics)
        return self.head.score(statistics["path" if self.name != registry.MSMA else "norms"])

    def describe_fit(self) -> dict:
        """What results.json says of the head: its choice (mixture components, covariance, cross-validated
        log-likelihood) where it made one."""
        head = self.head
        if isinstance(head, diffpath.DiffPathGMM):
            return {"mixture": head.chosen, "cv_loglik": head.cv_score}
        if isinstance(head, msma.MSMAGMM):
            return {"mixture": {"n_components": head.n_components}, "cv_loglik": head.cv_loglik}
        if isinstance(head, diffpath.DiffPathKDE):
            return {"bandwidth": head.bandwidth}
        return {}


def classifier_features(classifier) -> Features:
    """The classifier's penultimate features, what DDPM-OOD's ``features=classifier`` and LMD's
    ``distance=features`` read."""
    return lambda images: classifier.forward_with_features(images)[1]


def shared_statistics(detectors: Sequence[DiffusionDetector]) -> Dict[str, str]:
    """{detector: the earlier detector whose statistics it reuses} (equal :meth:`~DiffusionDetector.statistics_key`:
    DiffPath-6D and -1D on the same path)."""
    first: Dict[tuple, str] = {}
    out = {}
    for detector in detectors:
        key = detector.statistics_key()
        if key in first:
            out[detector.name] = first[key]
        else:
            first[key] = detector.name
    return out


def unet_evals(detectors: Sequence[DiffusionDetector]) -> int:
    """UNet evaluations per image of running ``detectors`` together: shared statistics counted once."""
    shared = shared_statistics(detectors)
    return sum(d.unet_evals_per_image() for d in detectors if d.name not in shared)


def statistics_of(detectors: Sequence[DiffusionDetector], images: torch.Tensor, ids: Sequence[str],
                  shared: Optional[dict] = None) -> Dict[str, Statistics]:
    """Every detector's statistics of one batch, computed once per :meth:`~DiffusionDetector.statistics_key`
    (DiffPath-6D and -1D share their path); ``shared`` keeps them across calls on the same batch."""
    shared = {} if shared is None else shared
    out = {}
    for detector in detectors:
        key = detector.statistics_key()
        if key not in shared:
            shared[key] = detector.statistics(images, ids)
        out[detector.name] = shared[key]
    return out
