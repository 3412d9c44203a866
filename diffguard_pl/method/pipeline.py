"""The DiffGuard pipeline as plain Python: models and config in, per-sample scores out.

    pipeline = DiffGuardPipeline(load_diffusion(path), load_classifier(path), DiffGuardConfig())
    out = pipeline(images)               # images [N, C, H, W] in [0, 1]; ids optional (default "0", "1", ...)
    out["scores"]["l2"], out["pred"]     # per-sample OOD scores (higher = more OOD) and predictions
    out["synthesis_pred"]                # what the classifier sees in the guided synthesis

Stages of a call: check inputs; classify the input (label y, logits, features); with DSG, the Grad-CAM mask
of y; encode (latent models); DDIM-invert for ``depth`` steps; synthesise back under y, in the same denoiser
batches as the unguided reconstruction when that is the reference; decode; score the distance between the
synthesis and the reference (with the unguided reference, also against the input, and the round trip's PSNR);
optionally re-synthesise under oracle labels (diffguard_pl/method/oracle.py).

Guidance (``diffguard.guidance.mode``): ``classifier``, classifier guidance with clean grad and cutout
(diffguard_pl/method/guidance.py; a class-conditional denoiser also receives the label); ``classifier_free``, classifier-free
guidance eps_u + omega (eps_c - eps_u), both branches in one denoiser batch, restricted by DSG to the
Grad-CAM mask (diffguard_pl/method/cam.py), eps_u outside. Inversion runs with the null class of a conditional model.

The walk (inversion and synthesis of every sample on its own schedule, in shared denoiser batches):
diffguard_pl/method/walk.py. Execution settings (autocast, channels-last, compile, cuDNN): diffguard_pl/method/runtime.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from diffguard_pl.method.aes import AdaptiveEarlyStop
from diffguard_pl.method.cam import dsg_mask, grad_cam
from diffguard_pl.config import DiffGuardConfig
from diffguard_pl.method.ddim import Ladder
from diffguard_pl.method.guidance import at_least_float32
from diffguard_pl.models.classifier import Classifier
from diffguard_pl.models.diffusion import DiffusionModel
from diffguard_pl.method.oracle import Oracle
from diffguard_pl.method.runtime import Runtime, ordinary
from diffguard_pl.method.scores import (
    CLASSIFIER, CONTRASTIVE, PIXEL, check_perceptual_files, classifier_distances, cosine_distance, perceptual_from,
    pixel_distances, psnr,
)
from diffguard_pl.method.walk import Walker
from diffguard_pl.records import columns as col


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Images as every entry point takes them (the pipeline, the Python API, the pytorch-ood detectors): a tensor
    [N, C, H, W] in [0, 1] without NaN or Inf; ValueError naming the problem and the fix. Returns ``images``."""
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {type(images).__name__} "
                         f"{list(getattr(images, 'shape', []))}")
    if not torch.isfinite(images).all():
        raise ValueError("input images contain NaN or Inf")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"images must lie in [0, 1], got [{float(images.min()):.3f}, {float(images.max()):.3f}]; "
                         f"images in [-1, 1] map to it as (x + 1) / 2")
    return images


@dataclass
class View:
    """Images in [0, 1] with what the distances read of them: the classifier's logits and penultimate features,
    and the contrastive encoder's features (None without ``contrastive`` among the distances)."""

    images: torch.Tensor
    logits: torch.Tensor
    feats: torch.Tensor
    embedding: Optional[torch.Tensor] = None

    def __getitem__(self, rows) -> "View":
        return View(self.images[rows], self.logits[rows], self.feats[rows],
                    None if self.embedding is None else self.embedding[rows])


@dataclass
class FirstWalk:
    """What an oracle's re-synthesis starts from: a call's inputs in [0, 1] and in model space, its walk's output
    (latents, depths), the predictions and their DSG masks, the ids, and the reference the scores compare to."""

    images: torch.Tensor
    x0: torch.Tensor
    run: dict
    pred: torch.Tensor
    masks: Optional[torch.Tensor]
    ids: List[str]
    reference: View


@dataclass
class Resynthesis:
    """An oracle's re-synthesis: the rows it ran again (device indices, possibly none), their scores and the
    denoiser evaluations it spent on each."""

    rows: torch.Tensor
    scores: Dict[str, torch.Tensor]
    unet_evals: torch.Tensor

    def scores_over(self, scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A copy of ``scores`` with the re-synthesised rows' scores in place of theirs."""
        merged = {name: value.clone() for name, value in scores.items()}
        for name, value in self.scores.items():
            merged[name][self.rows] = value
        return merged


class DiffGuardPipeline:
    def __init__(self, diffusion: DiffusionModel, classifier: Classifier, cfg: DiffGuardConfig,
                 dry_run: bool = False, encoder: Optional[Classifier] = None):
        check_models(diffusion, classifier, cfg, encoder)
        self.diffusion, self.classifier, self.cfg = diffusion, classifier.eval(), cfg
        # the contrastive distance's encoder (models.encoder), used only where that distance is asked for
        self.encoder = encoder.eval() if encoder is not None and CONTRASTIVE in cfg.distances else None
        self.diffusion.unet.eval()
        self.classifier_free = cfg.guidance.mode == "classifier_free"
        self.ladder = Ladder.build(diffusion.alphas_cumprod, cfg.num_steps, cfg.ladder, cfg.handoff,
                                   cfg.timestep_offset)
        self.runtime = Runtime(cfg.runtime)
        self.on_model_call: Optional[Callable[[str, tuple], None]] = None  # (kind, inputs) before each model call
        # dry_run (evaluate.py dry_run=true): check the DISTS / LPIPS weights files, load nothing; the pipeline
        # can then count its work (ladder, unet_evals) but not run.
        self.perceptual = perceptual_from(cfg.distances, cfg.perceptual_size, load=not dry_run)
        aes = None
        if dry_run:
            check_perceptual_files(["dists"] if cfg.aes.enabled and cfg.aes.dists is not None else [])
        else:
            aes = AdaptiveEarlyStop(cfg.aes, cfg.perceptual_size)
        # The walk's engine: walker.on_step(iteration, most) is called after each iteration (progress bars).
        self.walker = Walker(diffusion, self.classifier, cfg, self.ladder, self.runtime, aes, self._hook)

    @property
    def device(self) -> torch.device:
        return self.walker.device

    @property
    def synthesis_rows(self) -> int:
        """Denoiser rows per synthesis step and sample, without the reference: 2 with classifier-free guidance,
        else 1."""
        return 2 if self.classifier_free else 1

    def unet_evals(self, depth: int | torch.Tensor) -> int | torch.Tensor:
        """Denoiser evaluations per image after ``depth`` inversion steps (oracle re-synthesis not counted)."""
        return self.ladder.unet_evals(depth, self.synthesis_rows + int(self.cfg.reference == "unguided"))

    def to(self, device: torch.device | str) -> "DiffGuardPipeline":
        for module in (self.diffusion, self.classifier, self.perceptual, self.encoder):
            if module is not None:
                module.to(device)
        return self

    def running(self):
        """The runtime settings (channels-last, compile once; cuDNN) and the device, while a run lasts."""
        self.runtime.prepare([self.diffusion.unet, self.diffusion.vae, self.classifier, self.encoder],
                             self.diffusion.unet)
        return self.runtime.running(self.device)

    def _hook(self, kind: str, *inputs) -> None:
        if self.on_model_call is not None:
            self.on_model_call(kind, inputs)

    # ------------------------------------------------------------------ stages

    def check_inputs(self, images: torch.Tensor, ids: Sequence[str]) -> None:
        check_images(images)
        size, channels = self.diffusion.image_size, self.diffusion.image_channels
        if images.shape[1] != channels or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"DiffGuard expects images of shape [N, {channels}, {size}, {size}] (the diffusion model's "
                f"image channels and size), got {list(images.shape)}; set data.channels / data.resolution "
                f"to match the model"
            )
        if len(ids) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(ids)} ids")

    @torch.no_grad()
    def classify(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._hook("classifier", images01)
        with self.runtime.autocast(self.device):
            logits, feats = self.classifier.forward_with_features(self.runtime.model_input(images01))
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the classifier returned NaN or Inf logits; check models.classifier")
        return at_least_float32(logits), at_least_float32(feats)

    def dsg_masks(self, images01: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """DSG masks [N, 1, h, w] at the denoiser's resolution for ``labels``, or None without DSG."""
        free = self.cfg.guidance.classifier_free
        if not (self.classifier_free and free.dsg):
            return None
        self._hook("grad_cam", images01, labels)
        cam = grad_cam(self.classifier, images01, labels, free.cam_layer)
        return dsg_mask(cam, free.cam_threshold, self.diffusion.sample_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to model space (the autoencoder under the runtime's autocast), in the images' dtype."""
        if not self.diffusion.latent:
            return images
        self._hook("encode", images)
        with self.runtime.grad_free(), self.runtime.autocast(self.device):
            z = self.diffusion.encode(self.runtime.model_input(images))
        return ordinary(z.to(images.dtype))

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        """Model space (images or latents) to images in [0, 1]."""
        if self.diffusion.latent:
            self._hook("decode", z)
            with self.runtime.grad_free(), self.runtime.autocast(self.device):
                decoded = self.diffusion.decode(self.runtime.model_input(z))
            z = decoded.to(z.dtype)  # outside inference mode: the results below are ordinary tensors
        return ((z + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def view(self, images01: torch.Tensor, logits: Optional[torch.Tensor] = None,
             feats: Optional[torch.Tensor] = None) -> View:
        """What the distances read of ``images01`` (the classifier's ``logits`` / ``feats`` when known)."""
        if logits is None:
            logits, feats = self.classify(images01)
        embedding = None
        if self.encoder is not None:
            self._hook("encoder", images01)
            with self.runtime.autocast(self.device):
                _, embedding = self.encoder.forward_with_features(self.runtime.model_input(images01))
            embedding = at_least_float32(embedding)
        return View(images01, logits, feats, embedding)

    @torch.no_grad()
    def score(self, synthesis: View, reference: View) -> Dict[str, torch.Tensor]:
        """The distances ``diffguard.distances`` between synthesis and reference (higher = more OOD)."""
        names = self.cfg.distances
        scores = pixel_distances(synthesis.images, reference.images, [n for n in names if n in PIXEL])
        scores.update(classifier_distances(reference.logits, reference.feats, synthesis.logits, synthesis.feats,
                                           [n for n in names if n in CLASSIFIER]))
        if self.encoder is not None:
            scores[CONTRASTIVE] = cosine_distance(synthesis.embedding, reference.embedding)
        if self.perceptual is not None:
            scores.update(self.perceptual(synthesis.images, reference.images))
        for name, value in scores.items():
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"distance {name!r} is NaN or Inf for some samples")
        return {name: scores[name].float() for name in names}

    def run(self, x0: torch.Tensor, ids: Sequence[str], labels: Optional[torch.Tensor], with_reference: bool,
            **kwargs) -> dict:
        """The walk (:meth:`diffguard_pl.method.walk.Walker.run`) of model-space ``x0`` under the runtime settings."""
        with self.running():
            return self.walker.run(x0, ids, labels, with_reference, **kwargs)

    def invert(self, images: torch.Tensor, ids: Optional[Sequence[str]] = None,
               labels: Optional[torch.Tensor] = None) -> dict:
        """Inversion only (see :meth:`run`) of images in [0, 1] (checked): ``latent`` (model space), ``depth`` and
        ``curves`` per sample. ``labels`` are needed only by a conditional model without a null class."""
        ids = [str(i) for i in range(len(images))] if ids is None else list(ids)
        self.check_inputs(images, ids)
        with self.running():
            x0 = self.encode(images.to(self.device, at_least_float32(images).dtype) * 2 - 1)
            return self.run(x0, ids, labels, False, invert_only=True)

    def synthesize(self, latent: torch.Tensor, labels: torch.Tensor, ids: Optional[Sequence[str]] = None,
                   with_reference: bool = False, masks: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Guided synthesis from a model-space ``latent`` (from :meth:`invert`), as after ``diffguard.depth``
        inversion steps: images in [0, 1], and the unguided reference with ``with_reference``."""
        ids = [str(i) for i in range(len(latent))] if ids is None else list(ids)
        depth = torch.full((latent.shape[0],), self.cfg.depth, dtype=torch.long)
        with self.running():
            out = self.run(latent, ids, labels, with_reference, latent=latent, depth=depth, masks=masks)
            reference = None if out["reference"] is None else self.to_images(out["reference"])
            return self.to_images(out["synthesis"]), reference

    # ------------------------------------------------------------------ the whole method

    def __call__(self, images: torch.Tensor, ids: Optional[Sequence[str]] = None,
                 oracles: Optional[Dict[str, Oracle]] = None) -> dict:
        """Run DiffGuard on a batch of images in [0, 1].

        ``ids`` seed each sample's randomness (cutouts); by default "0", "1", ... (then a sample's crops
        depend on its position). ``oracles`` (diffguard_pl/method/oracle.py) re-synthesise the samples whose oracle
        label differs from the prediction (all of them where DSG changes) under the oracle label; their
        scores go to ``out["oracle_scores"][name]``.
        """
        ids = [str(i) for i in range(len(images))] if ids is None else list(ids)
        self.check_inputs(images, ids)
        with self.running():
            return self._call(images, ids, oracles or {})

    def _call(self, images: torch.Tensor, ids: List[str], oracles: Dict[str, Oracle]) -> dict:
        images = images.to(self.device, at_least_float32(next(self.classifier.parameters())).dtype)
        logits, feats = self.classify(images)
        pred = logits.argmax(dim=1)
        masks = self.dsg_masks(images, pred)
        x0 = self.encode(images * 2 - 1)
        with_reference = self.cfg.reference == "unguided"
        run = self.run(x0, ids, pred, with_reference, masks=masks)
        source = self.view(images, logits, feats)
        synthesis = self.view(self.to_images(run["synthesis"]))
        reference = self.view(self.to_images(run["reference"])) if with_reference else source
        scores = self.score(synthesis, reference)
        depth = run["depth"].cpu()
        unet_evals = self.unet_evals(depth)
        out = {  # the per-sample values a record keeps are named as their columns (diffguard_pl/records/columns.py)
            "logits": logits, "features": feats, col.PRED: pred, "synthesis": synthesis.images,
            col.SYNTHESIS_PRED: synthesis.logits.argmax(dim=1), "reference": reference.images,
            "scores": scores, col.DEPTH: depth, col.UNET_EVALS: unet_evals,
            "curves": {name: value.cpu() for name, value in run["curves"].items()},
        }
        if with_reference:  # what reference=input would score, and how well the unguided walk returns
            out["input_scores"] = self.score(synthesis, source)
            out[col.REFERENCE_PRED] = reference.logits.argmax(dim=1)
            out[col.ROUND_TRIP_PSNR] = psnr(reference.images, images)
        if masks is not None:
            out["masks"] = masks
        if oracles:
            first = FirstWalk(images, x0, run, pred, masks, ids, reference)
            out["oracle_scores"] = {}
            for name, oracle in oracles.items():
                again = self._oracle(first, oracle)
                out["oracle_scores"][name] = again.scores_over(scores)
                unet_evals[again.rows.cpu()] += again.unet_evals
        return out

    def _oracle(self, first: FirstWalk, oracle: Oracle) -> Resynthesis:
        """The synthesis under the oracle labels (-1: the prediction) of the samples whose synthesis changes."""
        labels = oracle.labels.to(self.device)
        labels = torch.where(labels >= 0, labels, first.pred)
        dsg_changes = first.masks is not None and not oracle.dsg
        redo = torch.ones_like(first.pred, dtype=torch.bool) if dsg_changes else labels != first.pred
        rows = redo.nonzero().flatten()
        if len(rows) == 0:
            return Resynthesis(rows, {}, torch.zeros(0, dtype=torch.long))
        depth = first.run["depth"][rows]
        masks = self.dsg_masks(first.images[rows], labels[rows]) if oracle.dsg else None
        again = self.run(first.x0[rows], [first.ids[i] for i in rows.tolist()], labels[rows], False,
                         latent=first.run["latent"][rows], depth=depth, masks=masks)
        scores = self.score(self.view(self.to_images(again["synthesis"])), first.reference[rows])
        return Resynthesis(rows, scores, self.ladder.synthesis_start(depth.cpu()) * self.synthesis_rows)


def check_models(diffusion: DiffusionModel, classifier: Classifier, cfg: DiffGuardConfig,
                 encoder: Optional[Classifier] = None) -> None:
    """What needs only the models' shapes and the config: raises ValueError naming the key and the fix."""
    if CONTRASTIVE in cfg.distances:
        if encoder is None:
            raise ValueError(f"distance {CONTRASTIVE!r} needs the contrastive encoder: set models.encoder (made by "
                             f"`python train.py --config conf/train_fashion_encoder.yaml`), or drop {CONTRASTIVE!r} "
                             f"from diffguard.distances")
        if encoder.spec.in_chans != diffusion.image_channels:
            raise ValueError(f"the encoder (models.encoder) takes {encoder.spec.in_chans}-channel images, the "
                             f"diffusion model {diffusion.image_channels}-channel ones: use models that agree")
    if classifier.spec.in_chans != diffusion.image_channels:
        raise ValueError(f"the classifier takes {classifier.spec.in_chans}-channel images, the diffusion model "
                         f"{diffusion.image_channels}-channel ones: use models that agree (data.channels)")
    if diffusion.conditional and classifier.spec.num_classes > diffusion.num_classes:
        raise ValueError(f"the classifier has {classifier.spec.num_classes} classes but the conditional diffusion "
                         f"model only {diffusion.num_classes}")
    if cfg.guidance.mode == "classifier_free" and (not diffusion.conditional or diffusion.null_class is None):
        raise ValueError("diffguard.guidance.mode=classifier_free needs a class-conditional diffusion model with a "
                         "null class; this one is unconditional or has no null class "
                         "(use diffguard.guidance.mode=classifier)")
    if diffusion.latent and cfg.clip_x0 != "none":
        raise ValueError("diffguard.clip_x0 clips to the image range [-1, 1]; a latent model has none (use none)")
    if diffusion.latent and cfg.aes.enabled and cfg.aes.dists is not None:
        raise ValueError("diffguard.aes.dists compares images; a latent model's AES compares latents (use psnr)")
