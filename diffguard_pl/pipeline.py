"""The DiffGuard pipeline as plain Python: models and config in, per-sample scores out.

    pipeline = DiffGuardPipeline(load_diffusion(path), load_classifier(path), DiffGuardConfig())
    out = pipeline(images, ids)          # images [N, C, H, W] in [0, 1], ids: stable sample ids
    out["scores"]["l2"], out["pred"]     # per-sample OOD scores (higher = more OOD) and predictions

Stages of a call: check inputs; classify the input (label y, logits, features);
DDIM-invert the input for ``depth`` of the ``num_steps`` spaced steps; synthesise
back from exactly that level under label y (classifier guidance with clean grad
and cutout; the label also goes to the UNet when it is class-conditional),
batched with an unguided reconstruction from the same latent when that is the
reference; score the distance between the synthesis and the reference.

Levels: the input is level -1 (alpha_bar = 1). Inversion step k goes from
level t_{k-1} to t_k with eps evaluated at timestep t_k; synthesis step from
t_k to t_{k-1} evaluates eps at t_k. So both directions use the same
timestep embedding for the same pair of levels, and synthesis begins at the
level t_{depth-1} the inversion reached.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from diffguard_pl.config import DiffGuardConfig
from diffguard_pl.ddim import alpha_bar, ddim_step, spaced_timesteps
from diffguard_pl.guidance import cutout_params, guided_eps
from diffguard_pl.models.classifier import Classifier
from diffguard_pl.models.diffusion import DiffusionModel
from diffguard_pl.scores import CLASSIFIER, PIXEL, classifier_distances, perceptual_from, pixel_distances


class DiffGuardPipeline:
    def __init__(self, diffusion: DiffusionModel, classifier: Classifier, cfg: DiffGuardConfig):
        if diffusion.conditional and classifier.spec.num_classes > diffusion.num_classes:
            raise ValueError(
                f"the classifier has {classifier.spec.num_classes} classes but the conditional diffusion model "
                f"only {diffusion.num_classes}"
            )
        if classifier.spec.in_chans != diffusion.in_channels:
            raise ValueError(
                f"classifier takes {classifier.spec.in_chans}-channel images, diffusion model "
                f"{diffusion.in_channels}-channel ones"
            )
        self.diffusion = diffusion
        self.classifier = classifier.eval()
        self.diffusion.unet.eval()
        self.cfg = cfg
        self.timesteps = spaced_timesteps(diffusion.num_train_timesteps, cfg.num_steps)[: cfg.depth]
        self.perceptual = perceptual_from(cfg.distances, cfg.perceptual_size)

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def to(self, device: torch.device | str) -> "DiffGuardPipeline":
        self.diffusion.to(device)
        self.classifier.to(device)
        if self.perceptual is not None:
            self.perceptual.to(device)
        return self

    @property
    def unet_evals_per_branch(self) -> int:
        return len(self.timesteps)

    # ------------------------------------------------------------------ stages

    def check_inputs(self, images: torch.Tensor, ids: Sequence[str]) -> None:
        size, channels = self.diffusion.sample_size, self.diffusion.in_channels
        if images.ndim != 4 or images.shape[1] != channels or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"DiffGuard expects images of shape [N, {channels}, {size}, {size}] (the diffusion model's "
                f"in_channels and sample_size), got {list(images.shape)}; set data.channels / data.resolution "
                f"to match the model"
            )
        if len(ids) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(ids)} ids")
        if not torch.isfinite(images).all():
            raise ValueError("input images contain NaN or Inf")
        if images.min() < -1e-3 or images.max() > 1 + 1e-3:
            raise ValueError(
                f"input images must lie in [0, 1], got [{images.min():.3f}, {images.max():.3f}]"
            )

    @torch.no_grad()
    def classify(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.classifier.forward_with_features(images01)
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the classifier returned NaN or Inf logits")
        return logits.float(), feats.float()

    def _levels(self, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timestep t_k, alpha_bar at t_k) as per-sample tensors, k = -1 meaning the clean level."""
        t = torch.full((n,), int(self.timesteps[k]) if k >= 0 else -1, dtype=torch.long, device=self.device)
        return t, alpha_bar(self.diffusion.alphas_cumprod, t)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM inversion of x0 (model space, [-1, 1]) to level t_{depth-1}."""
        x, n = x0, x0.shape[0]
        _, a_prev = self._levels(-1, n)
        for k in range(len(self.timesteps)):
            t, a_t = self._levels(k, n)
            eps = self.diffusion.eps(x, t)  # conditional models: the null class
            x = ddim_step(x, eps, a_prev, a_t)
            a_prev = a_t
        return x

    def synthesize(
        self, latent: torch.Tensor, labels: torch.Tensor, ids: Sequence[str], with_reference: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Guided synthesis from ``latent`` (level t_{depth-1}) to the clean level.

        With ``with_reference`` an unguided reconstruction from the same latent
        runs in the same UNet batch. Returns model-space images.
        """
        n, depth = latent.shape[0], len(self.timesteps)
        guidance = self.cfg.guidance
        crops = cutout_params(ids, depth, guidance.cutout, self.cfg.seed) if guidance.cutout.num > 0 else None
        cond = labels if self.diffusion.conditional else None
        x = torch.cat([latent, latent]) if with_reference else latent
        for k in range(depth - 1, -1, -1):
            t, a_t = self._levels(k, x.shape[0])
            _, a_s = self._levels(k - 1, x.shape[0])
            with torch.no_grad():
                if cond is None:
                    eps = self.diffusion.eps(x, t)
                else:
                    null = torch.full_like(cond, self.diffusion.null_class)
                    eps = self.diffusion.eps(x, t, torch.cat([cond, null]) if with_reference else cond)
            step_crops = None if crops is None else crops[:, depth - 1 - k].to(self.device)
            eps_guided = guided_eps(eps[:n], x[:n], a_t[:n], labels, self.classifier, guidance, step_crops)
            eps = torch.cat([eps_guided, eps[n:]]) if with_reference else eps_guided
            with torch.no_grad():
                x = ddim_step(x, eps, a_t, a_s)
        return (x[:n], x[n:]) if with_reference else (x, None)

    @torch.no_grad()
    def score(
        self,
        synthesis01: torch.Tensor,
        reference01: torch.Tensor,
        reference_logits: torch.Tensor,
        reference_feats: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        names = self.cfg.distances
        scores = pixel_distances(synthesis01, reference01, [n for n in names if n in PIXEL])
        if any(n in CLASSIFIER for n in names):
            logits, feats = self.classify(synthesis01)
            scores.update(classifier_distances(reference_logits, reference_feats, logits, feats, names))
        if self.perceptual is not None:
            scores.update(self.perceptual(synthesis01, reference01))
        for name, value in scores.items():
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"distance {name!r} is NaN or Inf for some samples")
        return {name: scores[name].float() for name in names}

    # ------------------------------------------------------------------ the whole method

    def __call__(
        self, images: torch.Tensor, ids: Sequence[str], oracle_labels: Optional[torch.Tensor] = None
    ) -> dict:
        """Run DiffGuard on a batch.

        ``oracle_labels`` (optional, -1 where unknown) re-synthesises the
        samples whose oracle label differs from the prediction under the oracle
        label; their scores go to ``out["oracle_scores"]`` (others share the
        normal scores, which are identical by construction).
        """
        self.check_inputs(images, ids)
        ids = list(ids)
        images = images.to(self.device, torch.float32)
        logits, feats = self.classify(images)
        pred = logits.argmax(dim=1)

        latent = self.invert(images * 2 - 1)
        with_reference = self.cfg.reference == "unguided"
        synthesis, reference = self.synthesize(latent, pred, ids, with_reference)
        synthesis01 = ((synthesis + 1) / 2).clamp(0, 1)
        branches = 2 if with_reference else 1

        if with_reference:
            reference01 = ((reference + 1) / 2).clamp(0, 1)
            ref_logits, ref_feats = self.classify(reference01)
        else:
            reference01, ref_logits, ref_feats = images, logits, feats
        scores = self.score(synthesis01, reference01, ref_logits, ref_feats)

        unet_evals = torch.full((len(ids),), (1 + branches) * len(self.timesteps), dtype=torch.long)
        out = {
            "logits": logits,
            "features": feats,
            "pred": pred,
            "synthesis": synthesis01,
            "reference": reference01,
            "scores": scores,
            "depth": torch.full((len(ids),), len(self.timesteps), dtype=torch.long),
            "unet_evals": unet_evals,
        }
        if oracle_labels is not None:
            out["oracle_scores"] = self._oracle(latent, oracle_labels.to(self.device), pred, ids, reference01,
                                                ref_logits, ref_feats, scores, unet_evals)
        return out

    def _oracle(self, latent, oracle_labels, pred, ids: List[str], reference01, ref_logits, ref_feats,
                scores: Dict[str, torch.Tensor], unet_evals: torch.Tensor) -> Dict[str, torch.Tensor]:
        redo = (oracle_labels >= 0) & (oracle_labels != pred)
        oracle = {name: value.clone() for name, value in scores.items()}
        if redo.any():
            idx = redo.nonzero().flatten()
            synthesis, _ = self.synthesize(latent[idx], oracle_labels[idx], [ids[i] for i in idx.tolist()], False)
            redone = self.score(((synthesis + 1) / 2).clamp(0, 1), reference01[idx], ref_logits[idx], ref_feats[idx])
            for name, value in redone.items():
                oracle[name][idx] = value
            unet_evals[idx.cpu()] += len(self.timesteps)
        return oracle
