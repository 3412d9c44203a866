"""The DiffGuard pipeline as plain Python: models and config in, per-sample scores out.

    pipeline = DiffGuardPipeline(load_diffusion(path), load_classifier(path), DiffGuardConfig())
    out = pipeline(images, ids)          # images [N, C, H, W] in [0, 1], ids: stable sample ids
    out["scores"]["l2"], out["pred"]     # per-sample OOD scores (higher = more OOD) and predictions

Stages of a call: check inputs; classify the input (label y, logits, features);
encode it when the model is a latent one; DDIM-invert for ``depth`` of the
``num_steps`` spaced steps; synthesise back from exactly that level under
label y, batched with an unguided reconstruction from the same latent when
that is the reference; decode; score the distance between the synthesis and
the reference.

Guidance (``diffguard.guidance.mode``):
- classifier: classifier guidance with clean grad and cutout; the label also
  goes to the denoiser when it is class-conditional.
- cfg: classifier-free guidance, eps_u + omega (eps_c - eps_u), the
  conditional and unconditional rows in the same denoiser batch; with DSG
  only inside the Grad-CAM mask of the label (computed once per image before
  the steps), eps_u outside.

Inversion always runs with the null class of a conditional model.

Levels: the input is level -1 (alpha_bar = 1). Inversion step k goes from
level t_{k-1} to t_k with eps evaluated at timestep t_k; synthesis step from
t_k to t_{k-1} evaluates eps at t_k. So both directions use the same
timestep embedding for the same pair of levels, and synthesis begins at the
level t_{depth-1} the inversion reached.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from diffguard_pl.aes import AdaptiveEarlyStop
from diffguard_pl.config import DiffGuardConfig
from diffguard_pl.ddim import alpha_bar, ddim_step, spaced_timesteps
from diffguard_pl.cam import dsg_mask, grad_cam
from diffguard_pl.guidance import at_least_float32, cfg_eps, cutout_params, guided_eps
from diffguard_pl.models.classifier import Classifier
from diffguard_pl.models.diffusion import DiffusionModel
from diffguard_pl.scores import (
    CLASSIFIER, PIXEL, check_perceptual_files, classifier_distances, perceptual_from, pixel_distances,
)


class DiffGuardPipeline:
    def __init__(self, diffusion: DiffusionModel, classifier: Classifier, cfg: DiffGuardConfig,
                 load_perceptual: bool = True):
        if diffusion.conditional and classifier.spec.num_classes > diffusion.num_classes:
            raise ValueError(
                f"the classifier has {classifier.spec.num_classes} classes but the conditional diffusion model "
                f"only {diffusion.num_classes}"
            )
        if classifier.spec.in_chans != diffusion.image_channels:
            raise ValueError(
                f"classifier takes {classifier.spec.in_chans}-channel images, diffusion model "
                f"{diffusion.image_channels}-channel ones"
            )
        self.cfg_mode = cfg.guidance.mode == "cfg"
        if self.cfg_mode and (not diffusion.conditional or diffusion.null_class is None):
            raise ValueError(
                "diffguard.guidance.mode=cfg needs a class-conditional diffusion model with a null class; "
                "this one is unconditional or has no null class (use guidance.mode=classifier)"
            )
        if diffusion.latent and cfg.clip_x0:
            raise ValueError("diffguard.clip_x0=true clips to the image range [-1, 1]; a latent model has none")
        if diffusion.latent and cfg.aes.enabled and cfg.aes.dists is not None:
            raise ValueError("diffguard.aes.dists compares images; a latent model's AES compares latents (use psnr)")
        self.diffusion = diffusion
        self.classifier = classifier.eval()
        self.diffusion.unet.eval()
        self.cfg = cfg
        self.timesteps = spaced_timesteps(diffusion.num_train_timesteps, cfg.num_steps)[: cfg.depth]
        self._tables: dict = {}  # per device: level -> (timestep, alpha_bar), not rebuilt every step
        # load_perceptual=False (dry runs: the pipeline cannot run) checks the DISTS / LPIPS files, loads nothing.
        self.perceptual = perceptual_from(cfg.distances, cfg.perceptual_size, load_perceptual)
        if load_perceptual:
            self.aes = AdaptiveEarlyStop(cfg.aes, cfg.perceptual_size)
        else:
            check_perceptual_files(["dists"] if cfg.aes.enabled and cfg.aes.dists is not None else [])

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @property
    def synthesis_rows(self) -> int:
        """Denoiser rows per synthesis step and sample, without the reference: 2 with CFG, else 1."""
        return 2 if self.cfg_mode else 1

    def to(self, device: torch.device | str) -> "DiffGuardPipeline":
        self.diffusion.to(device)
        self.classifier.to(device)
        if self.perceptual is not None:
            self.perceptual.to(device)
        return self

    # ------------------------------------------------------------------ stages

    def check_inputs(self, images: torch.Tensor, ids: Sequence[str]) -> None:
        size, channels = self.diffusion.image_size, self.diffusion.image_channels
        if images.ndim != 4 or images.shape[1] != channels or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"DiffGuard expects images of shape [N, {channels}, {size}, {size}] (the diffusion model's "
                f"image channels and size), got {list(images.shape)}; set data.channels / data.resolution "
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
        return at_least_float32(logits), at_least_float32(feats)

    def dsg_masks(self, images01: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """DSG masks [N, 1, h, w] at the denoiser's resolution for ``labels``, or None without DSG."""
        cfg = self.cfg.guidance.cfg
        if not (self.cfg_mode and cfg.dsg):
            return None
        cam = grad_cam(self.classifier, images01, labels, cfg.cam_layer)
        return dsg_mask(cam, cfg.cam_threshold, self.diffusion.sample_size)

    def _level_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timestep, alpha_bar) per level index + 1 (index 0 = the clean level), built once per device."""
        if device not in self._tables:
            timesteps = torch.cat([torch.tensor([-1]), self.timesteps])
            alphas = alpha_bar(self.diffusion.alphas_cumprod, timesteps)
            self._tables[device] = (timesteps.to(device), alphas.to(device))
        return self._tables[device]

    def _alpha(self, level: torch.Tensor) -> torch.Tensor:
        """alpha_bar at level indices (-1 = clean) as float64, on the level tensor's device."""
        return self._level_table(level.device)[1][level + 1]

    def _timestep(self, level: torch.Tensor) -> torch.Tensor:
        return self._level_table(level.device)[0][level + 1]

    def _condition(self, labels: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
        """Denoiser class labels: ``labels`` for a conditional model (null class where None), else None."""
        if not self.diffusion.conditional:
            return None
        if labels is None:
            return torch.full((n,), self.diffusion.null_class, dtype=torch.long, device=self.device)
        return labels

    def _unconditional(self, labels: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
        """Labels of rows that run "without a label" (inversion, reference): the null class where there is one.

        A conditional model without a null class (e.g. guided-diffusion's class-conditional ADM) runs
        them under the label itself.
        """
        if not self.diffusion.conditional or self.diffusion.null_class is not None:
            return self._condition(None, len(idx))
        if labels is None:
            raise ValueError(
                "this class-conditional diffusion model has no null class, so inversion needs the label "
                "(pass labels, or use an unconditional model / one trained with a null class)"
            )
        return labels[idx]

    def run(
        self,
        x0: torch.Tensor,
        ids: Sequence[str],
        labels: Optional[torch.Tensor],
        with_reference: bool,
        latent: Optional[torch.Tensor] = None,
        depth: Optional[torch.Tensor] = None,
        invert_only: bool = False,
        masks: Optional[torch.Tensor] = None,
    ) -> dict:
        """Invert and synthesise every sample on its own schedule, all in shared UNet batches.

        Each sample is in one phase: inverting (level k -> k + 1, eps at
        t_{k+1}), synthesising (level k -> k - 1, eps at t_k) or done. Every
        iteration makes one UNet call over the samples still at work (plus the
        unguided reference rows), so a sample that stops inverting early
        (adaptive early stop) starts its synthesis while others keep inverting.
        Inversion stops at ``diffguard.depth`` steps, or earlier by the AES
        rule; synthesis starts at exactly the level the inversion reached.

        With ``latent`` and ``depth`` given (an earlier inversion), only the
        synthesis runs; with ``invert_only`` only the inversion. ``masks``
        are the DSG masks of the CFG mode (None: guidance everywhere). Returns
        model-space ``synthesis`` and ``reference``, per-sample ``depth``,
        ``latent`` (where synthesis started) and the per-step ``curves`` of
        the inversion (NaN after a sample stopped).
        """
        n, cap = x0.shape[0], len(self.timesteps)
        device = self.device
        guidance = self.cfg.guidance
        use_crops = not self.cfg_mode and guidance.cutout.num > 0
        crops = cutout_params(ids, cap, guidance.cutout, self.cfg.seed) if use_crops else None
        if latent is None:
            x, level = x0.clone(), torch.full((n,), -1, dtype=torch.long, device=device)
            phase = torch.zeros(n, dtype=torch.long, device=device)  # 0 invert, 1 synthesise, 2 done
            depth = torch.zeros(n, dtype=torch.long, device=device)
            latent = torch.empty_like(x0)
        else:
            x, level = latent.clone(), (depth - 1).to(device)
            phase = torch.ones(n, dtype=torch.long, device=device)
        x_ref = x.clone() if with_reference else None
        curves = {name: torch.full((n, cap), float("nan"), device=device) for name in self.aes.curve_names}

        while bool((phase < 2).any()):
            inv, syn = (phase == 0).nonzero().flatten(), (phase == 1).nonzero().flatten()
            # One denoiser call: inverting rows (null class), synthesising rows (label), with CFG their
            # unconditional twins (null class), and reference rows (null class).
            rows, steps = [x[inv], x[syn]], [level[inv] + 1, level[syn]]
            syn_labels = None if labels is None else labels[syn]
            conds = [self._unconditional(labels, inv), self._condition(syn_labels, len(syn))]
            extra = (["uncond"] if self.cfg_mode else []) + (["reference"] if with_reference else [])
            for name in extra:
                rows.append(x_ref[syn] if name == "reference" else x[syn])
                steps.append(level[syn])
                conds.append(self._unconditional(labels, syn))
            with torch.no_grad():
                class_labels = None if conds[0] is None else torch.cat(conds)
                eps = self.diffusion.eps(torch.cat(rows), self._timestep(torch.cat(steps)), class_labels)
            eps_inv, eps_syn, *eps_extra = eps.split([len(r) for r in rows])
            eps_extra = dict(zip(extra, eps_extra))
            eps_ref = eps_extra.get("reference")

            if len(syn):
                a_t, a_s = self._alpha(level[syn]), self._alpha(level[syn] - 1)
                if self.cfg_mode:
                    step_masks = None if masks is None else masks[syn]
                    eps_syn = cfg_eps(eps_syn, eps_extra["uncond"], guidance.cfg.omega, step_masks)
                else:
                    step_crops = None if crops is None else crops[syn.cpu(), level[syn].cpu()].to(device)
                    eps_syn = guided_eps(eps_syn, x[syn], a_t, labels[syn], self.classifier, guidance, step_crops)
                clip = self.cfg.clip_x0
                with torch.no_grad():
                    x[syn] = ddim_step(x[syn], eps_syn, a_t, a_s, clip)
                    if with_reference:
                        x_ref[syn] = ddim_step(x_ref[syn], eps_ref, a_t, a_s, clip)
                level[syn] -= 1
                phase[syn[level[syn] < 0]] = 2

            if len(inv):
                with torch.no_grad():
                    x[inv] = ddim_step(x[inv], eps_inv, self._alpha(level[inv]), self._alpha(level[inv] + 1))
                level[inv] += 1
                quality = self.aes.quality(x[inv], x0[inv])
                for name, value in quality.items():
                    curves[name][inv, level[inv]] = value.to(curves[name].dtype)
                stop = self.aes.should_stop(quality, level[inv] + 1, cap)
                stopped = inv[stop]
                phase[stopped], depth[stopped] = (2 if invert_only else 1), level[stopped] + 1
                latent[stopped] = x[stopped]
                if with_reference:
                    x_ref[stopped] = x[stopped]
        return {"synthesis": x, "reference": x_ref, "depth": depth, "latent": latent, "curves": curves}

    def invert(self, x0: torch.Tensor, ids: Sequence[str], labels: Optional[torch.Tensor] = None) -> dict:
        """Inversion only (see :meth:`run`): ``latent``, ``depth`` and ``curves`` per sample.

        ``labels`` are needed only by a conditional model without a null class.
        """
        return self.run(x0, ids, labels, False, invert_only=True)

    def synthesize(
        self, latent: torch.Tensor, labels: torch.Tensor, ids: Sequence[str], with_reference: bool,
        masks: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Guided synthesis from ``latent`` at level t_{depth-1} (see :meth:`run`)."""
        depth = torch.full((latent.shape[0],), len(self.timesteps), dtype=torch.long, device=self.device)
        out = self.run(latent, ids, labels, with_reference, latent=latent, depth=depth, masks=masks)
        return out["synthesis"], out["reference"]

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
        images = images.to(self.device, at_least_float32(next(self.classifier.parameters())).dtype)
        logits, feats = self.classify(images)
        pred = logits.argmax(dim=1)
        masks = self.dsg_masks(images, pred)

        x0 = self.diffusion.encode(images * 2 - 1)
        with_reference = self.cfg.reference == "unguided"
        run = self.run(x0, ids, pred, with_reference, masks=masks)
        synthesis01 = self.to_images(run["synthesis"])
        if with_reference:
            reference01 = self.to_images(run["reference"])
            ref_logits, ref_feats = self.classify(reference01)
        else:
            reference01, ref_logits, ref_feats = images, logits, feats
        scores = self.score(synthesis01, reference01, ref_logits, ref_feats)
        depth = run["depth"].cpu()
        unet_evals = depth * (1 + self.synthesis_rows + int(with_reference))

        out = {
            "logits": logits,
            "features": feats,
            "pred": pred,
            "synthesis": synthesis01,
            "reference": reference01,
            "scores": scores,
            "depth": depth,
            "unet_evals": unet_evals,
            "curves": {name: value.cpu() for name, value in run["curves"].items()},
        }
        if masks is not None:
            out["masks"] = masks
        if oracle_labels is not None:
            out["oracle_scores"] = self._oracle(images, x0, run, oracle_labels.to(self.device), pred, ids,
                                                (reference01, ref_logits, ref_feats), scores, unet_evals)
        return out

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        """Model space (images or latents) to images in [0, 1]."""
        return ((self.diffusion.decode(z) + 1) / 2).clamp(0, 1)

    def _oracle(self, images, x0, run: dict, oracle_labels, pred, ids: List[str], reference: tuple,
                scores: Dict[str, torch.Tensor], unet_evals: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Scores with the oracle label; only samples whose oracle label differs are re-synthesised.

        With DSG the mask is recomputed for the oracle label.
        """
        redo = (oracle_labels >= 0) & (oracle_labels != pred)
        oracle = {name: value.clone() for name, value in scores.items()}
        if redo.any():
            idx = redo.nonzero().flatten()
            masks = self.dsg_masks(images[idx], oracle_labels[idx])
            again = self.run(x0[idx], [ids[i] for i in idx.tolist()], oracle_labels[idx], False,
                             latent=run["latent"][idx], depth=run["depth"][idx], masks=masks)
            synthesis01 = self.to_images(again["synthesis"])
            redone = self.score(synthesis01, *(r[idx] for r in reference))
            for name, value in redone.items():
                oracle[name][idx] = value
            unet_evals[idx.cpu()] += run["depth"][idx].cpu() * self.synthesis_rows
        return oracle
