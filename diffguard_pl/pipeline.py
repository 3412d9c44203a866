"""The DiffGuard pipeline as plain Python: models and config in, per-sample scores out.

    pipeline = DiffGuardPipeline(load_diffusion(path), load_classifier(path), DiffGuardConfig())
    out = pipeline(images)               # images [N, C, H, W] in [0, 1]; ids optional (default "0", "1", ...)
    out["scores"]["l2"], out["pred"]     # per-sample OOD scores (higher = more OOD) and predictions
    out["synthesis_pred"]                # what the classifier sees in the guided synthesis

Stages of a call: check inputs; classify the input (label y, logits, features); with DSG, the Grad-CAM mask
of y; encode (latent models); DDIM-invert for ``depth`` steps; synthesise back under y, in the same denoiser
batches as the unguided reconstruction when that is the reference; decode; score the distance between the
synthesis and the reference; optionally re-synthesise under oracle labels (diffguard_pl/oracle.py).

Guidance (``diffguard.guidance.mode``): ``classifier``, classifier guidance with clean grad and cutout
(diffguard_pl/guidance.py; a class-conditional denoiser also receives the label); ``classifier_free``, classifier-free
guidance eps_u + omega (eps_c - eps_u), both branches in one denoiser batch, restricted by DSG to the
Grad-CAM mask (diffguard_pl/cam.py), eps_u outside. Inversion runs with the null class of a conditional model.

The walk (:meth:`DiffGuardPipeline.run`): every sample is inverting, synthesising or done, on the levels of
a :class:`~diffguard_pl.ddim.Ladder`. Each iteration makes one denoiser call over every row still at work,
then one synthesis step over the synthesising rows and one inversion step over the inverting rows (they
share one level). A sample that the adaptive early stop (diffguard_pl/aes.py) stops starts its synthesis
while others keep inverting. Bookkeeping (phase, level, depth) lives on the CPU, so scheduling never waits
for the device; while all rows are in one phase at one level, they are used as they are and the step
coefficients are scalars (no gathers). Execution settings: diffguard_pl/runtime.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from diffguard_pl.aes import AdaptiveEarlyStop
from diffguard_pl.cam import dsg_mask, grad_cam
from diffguard_pl.config import DiffGuardConfig
from diffguard_pl.ddim import Ladder, ddim_step, eps_from_x0, predict_x0
from diffguard_pl.guidance import CutoutPlan, at_least_float32, classifier_free_eps, guided_eps
from diffguard_pl.models.classifier import Classifier
from diffguard_pl.models.diffusion import DiffusionModel
from diffguard_pl.oracle import Oracle
from diffguard_pl.runtime import Runtime, ordinary
from diffguard_pl.scores import (
    CLASSIFIER, PIXEL, check_perceptual_files, classifier_distances, perceptual_from, pixel_distances,
)

INVERT, SYNTHESISE, DONE = 0, 1, 2
NONFINITE = ("the diffusion model returned NaN or Inf during the walk. Likeliest causes, in order: a guidance "
             "scale or omega too large (diffguard.guidance.scale / diffguard.guidance.classifier_free.omega), "
             "a broken checkpoint (models.diffusion), input images outside [0, 1]")


@dataclass
class Rows:
    """Rows of a batch in one phase: CPU indices, device indices (None: every row, in order) and the level
    (one int for all, or a per-row device tensor)."""

    cpu: torch.Tensor
    device: Optional[torch.Tensor]
    level: Union[int, torch.Tensor]


@dataclass
class Walk:
    """The state of one run: model-space tensors on the device, per-sample bookkeeping on the CPU."""

    x: torch.Tensor  # every sample's current point
    x0: torch.Tensor  # the inputs (for the early stop)
    reference: Optional[torch.Tensor]  # unguided reconstructions, with reference=unguided
    latent: torch.Tensor  # where each synthesis started
    labels: Optional[torch.Tensor]  # synthesis labels
    masks: Optional[torch.Tensor]  # DSG masks
    crops: Optional[CutoutPlan]
    level: torch.Tensor  # CPU: the ladder level of x
    phase: torch.Tensor  # CPU: INVERT, SYNTHESISE or DONE
    depth: torch.Tensor  # CPU: inversion steps taken
    curves: Dict[str, torch.Tensor]  # [N, depth] inversion quality after each step (NaN after a stop)


def _take(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    return t if rows is None else t[rows]


def _put(t: torch.Tensor, rows: Optional[torch.Tensor], value: torch.Tensor) -> None:
    if rows is None:
        t.copy_(value)
    else:
        t[rows] = value


class DiffGuardPipeline:
    def __init__(self, diffusion: DiffusionModel, classifier: Classifier, cfg: DiffGuardConfig,
                 load_perceptual: bool = True):
        check_models(diffusion, classifier, cfg)
        self.diffusion, self.classifier, self.cfg = diffusion, classifier.eval(), cfg
        self.diffusion.unet.eval()
        self.classifier_free = cfg.guidance.mode == "classifier_free"
        self.ladder = Ladder.build(diffusion.alphas_cumprod, cfg.num_steps, cfg.ladder, cfg.handoff,
                                   cfg.timestep_offset)
        self.runtime = Runtime(cfg.runtime)
        self.force_rows = False  # tests: gather rows and per-row coefficients even where all rows agree
        self.on_model_call: Optional[Callable[[str, tuple], None]] = None  # (kind, inputs) before each model call
        self.on_step: Optional[Callable[[int, int], None]] = None  # (iteration, most iterations) after each one
        self._finite: List[torch.Tensor] = []  # per denoiser call of a run: eps all finite (read once)
        self._constants: dict = {}  # (value, n, device) -> long tensor (timesteps, null labels)
        # load_perceptual=False (dry runs: the pipeline cannot run) checks the DISTS / LPIPS files, loads nothing.
        self.perceptual = perceptual_from(cfg.distances, cfg.perceptual_size, load_perceptual)
        if load_perceptual:
            self.aes = AdaptiveEarlyStop(cfg.aes, cfg.perceptual_size)
        else:
            check_perceptual_files(["dists"] if cfg.aes.enabled and cfg.aes.dists is not None else [])

    @property
    def device(self) -> torch.device:
        return self.runtime.device or next(self.classifier.parameters()).device

    @property
    def synthesis_rows(self) -> int:
        """Denoiser rows per synthesis step and sample, without the reference: 2 with classifier-free guidance,
        else 1."""
        return 2 if self.classifier_free else 1

    def to(self, device: torch.device | str) -> "DiffGuardPipeline":
        for module in (self.diffusion, self.classifier, self.perceptual):
            if module is not None:
                module.to(device)
        return self

    def running(self):
        """The runtime settings (channels-last, compile once; cuDNN) and the device, while a run lasts."""
        self.runtime.prepare([self.diffusion.unet, self.diffusion.vae, self.classifier], self.diffusion.unet)
        return self.runtime.running(self.device)

    def _hook(self, kind: str, *inputs) -> None:
        if self.on_model_call is not None:
            self.on_model_call(kind, inputs)

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
            raise ValueError(f"input images must lie in [0, 1], got [{images.min():.3f}, {images.max():.3f}]; "
                             f"images in [-1, 1] map to it as (x + 1) / 2")

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
    def score(self, synthesis01: torch.Tensor, reference01: torch.Tensor, reference_logits: torch.Tensor,
              reference_feats: torch.Tensor, synthesis_logits: Optional[list] = None) -> Dict[str, torch.Tensor]:
        """The distances ``diffguard.distances`` between synthesis and reference (higher = more OOD).

        ``synthesis_logits``: a list that receives the classifier's logits on the synthesis.
        """
        names = self.cfg.distances
        scores = pixel_distances(synthesis01, reference01, [n for n in names if n in PIXEL])
        if any(n in CLASSIFIER for n in names) or synthesis_logits is not None:
            logits, feats = self.classify(synthesis01)
            scores.update(classifier_distances(reference_logits, reference_feats, logits, feats,
                                               [n for n in names if n in CLASSIFIER]))
            if synthesis_logits is not None:
                synthesis_logits.append(logits)
        if self.perceptual is not None:
            scores.update(self.perceptual(synthesis01, reference01))
        for name, value in scores.items():
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"distance {name!r} is NaN or Inf for some samples")
        return {name: scores[name].float() for name in names}

    # ------------------------------------------------------------------ the walk

    def run(self, x0: torch.Tensor, ids: Sequence[str], labels: Optional[torch.Tensor], with_reference: bool,
            latent: Optional[torch.Tensor] = None, depth: Optional[torch.Tensor] = None, invert_only: bool = False,
            masks: Optional[torch.Tensor] = None) -> dict:
        """Invert and synthesise every sample on its own schedule, all in shared denoiser batches.

        Inversion stops after ``diffguard.depth`` steps, or earlier by the AES rule; synthesis starts at the
        level the inversion reached (see :class:`~diffguard_pl.ddim.Ladder`). With ``latent`` and ``depth``
        (an earlier inversion) only the synthesis runs; with ``invert_only`` only the inversion. Returns
        model-space ``synthesis`` and ``reference``, per-sample ``depth``, ``latent`` and the per-step
        ``curves`` of the inversion.
        """
        with self.running():
            walk = self._start(x0, ids, labels, with_reference, latent, depth, masks)
            self._finite = []
            most = (0 if latent is not None else self.cfg.depth) + (0 if invert_only else
                                                                     self.ladder.synthesis_start(self.cfg.depth))
            try:
                self._walk(walk, invert_only, most)
                if self._finite and not bool(torch.stack(self._finite).all()):  # the run's one read of them
                    raise FloatingPointError(NONFINITE)
            finally:
                self._finite = []
        return {"synthesis": walk.x, "reference": walk.reference, "depth": walk.depth.to(self.device),
                "latent": walk.latent, "curves": walk.curves}

    def _start(self, x0, ids, labels, with_reference, latent, depth, masks) -> Walk:
        n, cfg = x0.shape[0], self.cfg
        if self.diffusion.conditional and self.diffusion.null_class is None and labels is None:
            raise ValueError("this class-conditional diffusion model has no null class, so inversion needs the "
                             "label: pass labels, or use an unconditional model / one trained with a null class")
        guidance = cfg.guidance
        crops = None
        if not self.classifier_free and guidance.scale != 0 and guidance.cutout.num > 0:
            levels = self.ladder.synthesis_start(cfg.depth)  # synthesis steps start at levels 1 .. this
            crops = CutoutPlan.draw(ids, levels, guidance.cutout, cfg.seed, self.diffusion.image_size, x0.dtype)
        if latent is None:
            level, phase, steps = torch.full((n,), self.ladder.start), torch.full((n,), INVERT), torch.zeros(n)
            x, latent = x0.clone(), torch.empty_like(x0)
        else:
            steps = depth.cpu().clone()
            level, phase, x = self.ladder.synthesis_start(steps), torch.full((n,), SYNTHESISE), latent.clone()
        curves = {name: torch.full((n, cfg.depth), float("nan"), device=self.device) for name in self.aes.curve_names}
        return Walk(x, x0, x.clone() if with_reference else None, latent, labels, masks, crops,
                    level.long(), phase.long(), steps.long(), curves)

    def _rows(self, walk: Walk, phase: int) -> Optional[Rows]:
        idx = (walk.phase == phase).nonzero().flatten()
        if len(idx) == 0:
            return None
        levels = walk.level[idx]
        if not self.force_rows and bool((levels == levels[0]).all()):
            level: Union[int, torch.Tensor] = int(levels[0])
        else:
            level = levels.to(self.device, non_blocking=True)
        every = len(idx) == len(walk.phase) and not self.force_rows
        return Rows(idx, None if every else idx.to(self.device, non_blocking=True), level)

    def _walk(self, walk: Walk, invert_only: bool, most: int) -> None:
        iteration = 0
        while True:
            inv, syn = self._rows(walk, INVERT), self._rows(walk, SYNTHESISE)
            if inv is None and syn is None:
                return
            eps = self._denoise(walk, inv, syn)
            if syn is not None:
                self._synthesis_step(walk, syn, eps["synthesis"], eps)
            if inv is not None:
                self._inversion_step(walk, inv, eps["inversion"], invert_only)
            iteration += 1
            if self.on_step is not None:
                self.on_step(iteration, max(most, iteration))

    def _constant(self, value: int, n: int) -> torch.Tensor:
        """A cached device tensor of ``n`` copies of ``value`` (timesteps, null labels)."""
        key = (value, n, self.device)
        if key not in self._constants:
            if len(self._constants) > 4096:
                self._constants.clear()
            self._constants[key] = torch.full((n,), value, dtype=torch.long, device=self.device)
        return self._constants[key]

    def _timesteps(self, level: Union[int, torch.Tensor], n: int) -> torch.Tensor:
        if isinstance(level, int):
            return self._constant(int(self.ladder.timesteps[level]), n)
        return self.ladder.on(self.device, torch.float64)[0][level]

    def _coef(self, level: Union[int, torch.Tensor], like: torch.Tensor) -> tuple:
        """(sqrt(a), sqrt(1 - a)) of ``level`` in ``like``'s dtype, shaped to broadcast over its rows."""
        _, root_a, root_1ma = self.ladder.on(self.device, like.dtype)
        shape = (1,) * like.ndim if isinstance(level, int) else (-1,) + (1,) * (like.ndim - 1)
        return root_a[level].view(shape), root_1ma[level].view(shape)

    def _label_rows(self, walk: Walk, rows: Rows, guided: bool) -> Optional[torch.Tensor]:
        """Denoiser labels of ``rows``: the synthesis label where ``guided``, else the null class (a conditional
        model without one runs everything under the label)."""
        if not self.diffusion.conditional:
            return None
        null = self.diffusion.null_class
        if walk.labels is not None and (guided or null is None):
            return _take(walk.labels, rows.device)
        return self._constant(null, len(rows.cpu))

    def _denoise(self, walk: Walk, inv: Optional[Rows], syn: Optional[Rows]) -> Dict[str, torch.Tensor]:
        """One denoiser call: inverting rows, synthesising rows, their unconditional twins (classifier-free guidance)
        and reference rows."""
        parts, inputs, steps, labels = [], [], [], []

        def add(name, x, level, rows, guided):
            parts.append(name)
            inputs.append(x)
            steps.append(self._timesteps(level, len(rows.cpu)))
            labels.append(self._label_rows(walk, rows, guided))

        with self.runtime.grad_free():
            if inv is not None:
                add("inversion", _take(walk.x, inv.device), self.ladder.inversion_eps_level(inv.level), inv, False)
            if syn is not None:
                x_syn = _take(walk.x, syn.device)
                add("synthesis", x_syn, syn.level, syn, True)
                if self.classifier_free:
                    add("uncond", x_syn, syn.level, syn, False)
                if walk.reference is not None:
                    add("reference", _take(walk.reference, syn.device), syn.level, syn, False)
            batch = self.runtime.model_input(inputs[0] if len(inputs) == 1 else torch.cat(inputs))
            t = steps[0] if len(steps) == 1 else torch.cat(steps)
            class_labels = None
            if self.diffusion.conditional:
                class_labels = labels[0] if len(labels) == 1 else torch.cat(labels)
            self._hook("denoiser", batch, t, class_labels)
            with self.runtime.autocast(self.device):
                eps = self.diffusion.eps(batch, t, class_labels, check_finite=False)
            self._finite.append(torch.isfinite(eps).all())
            eps = eps.to(walk.x.dtype)
        chunks = eps.split([len(x) for x in inputs]) if len(inputs) > 1 else [eps]
        return dict(zip(parts, chunks))

    def _clipped(self, x: torch.Tensor, eps: torch.Tensor, coef: tuple) -> torch.Tensor:
        """The eps re-derived from the clipped x0 prediction (guided-diffusion's clip_denoised)."""
        return eps_from_x0(x, predict_x0(x, eps, None, coef).clamp(-1, 1), coef)

    def _synthesis_step(self, walk: Walk, rows: Rows, eps: torch.Tensor, extra: Dict[str, torch.Tensor]) -> None:
        """Level k -> k - 1 (eps at level k) for ``rows``: guided, clipped as configured; the reference unguided."""
        guidance, clip = self.cfg.guidance, self.cfg.clip_x0 != "none"
        x = _take(walk.x, rows.device)
        coef_t, coef_s = self._coef(rows.level, x), self._coef(rows.level - 1, x)
        if self.classifier_free:
            with self.runtime.grad_free():
                eps = classifier_free_eps(eps, extra["uncond"], guidance.classifier_free.omega,
                                          _take(walk.masks, rows.device) if walk.masks is not None else None)
        step_eps = self._clipped(x, eps, coef_t) if clip else eps
        if not self.classifier_free and guidance.scale != 0:  # outside inference mode: the classifier's gradient
            crops = None if walk.crops is None else walk.crops.at(rows.device, rows.level, self.device)
            labels = _take(walk.labels, rows.device)
            self._hook("guidance", x, labels, crops)
            with self.runtime.autocast(self.device):
                step_eps = guided_eps(eps, x, None, labels, self.classifier, guidance, crops, coef_t, base=step_eps)
        with self.runtime.grad_free():
            _put(walk.x, rows.device, ddim_step(x, step_eps, None, None, coef_t=coef_t, coef_s=coef_s))
            if walk.reference is not None:
                ref, ref_eps = _take(walk.reference, rows.device), extra["reference"]
                ref_eps = self._clipped(ref, ref_eps, coef_t) if clip else ref_eps
                _put(walk.reference, rows.device, ddim_step(ref, ref_eps, None, None, coef_t=coef_t, coef_s=coef_s))
        walk.level[rows.cpu] -= 1
        walk.phase[rows.cpu[walk.level[rows.cpu] == 0]] = DONE

    def _inversion_step(self, walk: Walk, rows: Rows, eps: torch.Tensor, invert_only: bool) -> None:
        """Level k -> k + 1 for ``rows`` (all at one level), then the early-stop rule."""
        k = int(walk.level[rows.cpu[0]])
        x = _take(walk.x, rows.device)
        with self.runtime.grad_free():
            coef_t, coef_s = self._coef(k, x), self._coef(k + 1, x)
            if self.cfg.clip_x0 == "both" and k > self.ladder.start:
                eps = self._clipped(x, eps, coef_t)
            x = ddim_step(x, eps, None, None, coef_t=coef_t, coef_s=coef_s)
            _put(walk.x, rows.device, x)
            walk.level[rows.cpu] += 1
            walk.depth[rows.cpu] += 1
            steps = int(walk.depth[rows.cpu[0]])
            quality = self.aes.quality(x, _take(walk.x0, rows.device))
            for name, value in quality.items():
                walk.curves[name][slice(None) if rows.device is None else rows.device, steps - 1] = \
                    value.to(walk.curves[name].dtype)
            if self.aes.thresholds:  # the stop rule reads device values once per step (by design)
                stop = self.aes.should_stop(quality, self._constant(steps, len(rows.cpu)), self.cfg.depth).cpu()
            else:
                stop = torch.full((len(rows.cpu),), steps >= self.cfg.depth)
            stopped = rows.cpu[stop]
            if len(stopped) == 0:
                return
            every = len(stopped) == len(walk.phase) and not self.force_rows
            stopped_d = None if every else stopped.to(self.device, non_blocking=True)
            _put(walk.latent, stopped_d, _take(walk.x, stopped_d))
            if walk.reference is not None:
                _put(walk.reference, stopped_d, _take(walk.x, stopped_d))
        walk.phase[stopped] = DONE if invert_only else SYNTHESISE
        walk.level[stopped] = self.ladder.synthesis_start(walk.depth[stopped])

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
        depend on its position). ``oracles`` (diffguard_pl/oracle.py) re-synthesise the samples whose oracle
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
        synthesis01 = self.to_images(run["synthesis"])
        if with_reference:
            reference01 = self.to_images(run["reference"])
            ref_logits, ref_feats = self.classify(reference01)
        else:
            reference01, ref_logits, ref_feats = images, logits, feats
        synthesis_logits: list = []
        scores = self.score(synthesis01, reference01, ref_logits, ref_feats, synthesis_logits)
        depth = run["depth"].cpu()
        synthesis_steps = self.ladder.synthesis_start(depth)
        unet_evals = depth + synthesis_steps * (self.synthesis_rows + int(with_reference))
        out = {
            "logits": logits, "features": feats, "pred": pred, "synthesis": synthesis01,
            "synthesis_pred": synthesis_logits[0].argmax(dim=1), "reference": reference01,
            "scores": scores, "depth": depth, "unet_evals": unet_evals,
            "curves": {name: value.cpu() for name, value in run["curves"].items()},
        }
        if masks is not None:
            out["masks"] = masks
        if oracles:
            reference = (reference01, ref_logits, ref_feats)
            out["oracle_scores"] = {
                name: self._oracle(images, x0, run, oracle, pred, masks, ids, reference, scores, unet_evals)
                for name, oracle in oracles.items()
            }
        return out

    def _oracle(self, images, x0, run: dict, oracle: Oracle, pred, masks, ids: List[str], reference: tuple,
                scores: Dict[str, torch.Tensor], unet_evals: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Scores under the oracle labels (-1: the prediction); only samples whose synthesis changes run again."""
        labels = oracle.labels.to(self.device)
        labels = torch.where(labels >= 0, labels, pred)
        dsg_changes = masks is not None and not oracle.dsg
        redo = torch.ones_like(pred, dtype=torch.bool) if dsg_changes else labels != pred
        result = {name: value.clone() for name, value in scores.items()}
        if redo.any():
            idx = redo.nonzero().flatten()
            redo_masks = self.dsg_masks(images[idx], labels[idx]) if oracle.dsg else None
            again = self.run(x0[idx], [ids[i] for i in idx.tolist()], labels[idx], False,
                             latent=run["latent"][idx], depth=run["depth"][idx], masks=redo_masks)
            redone = self.score(self.to_images(again["synthesis"]), *(r[idx] for r in reference))
            for name, value in redone.items():
                result[name][idx] = value
            unet_evals[idx.cpu()] += self.ladder.synthesis_start(run["depth"][idx].cpu()) * self.synthesis_rows
        return result


def check_models(diffusion: DiffusionModel, classifier: Classifier, cfg: DiffGuardConfig) -> None:
    """What needs only the models' shapes and the config: raises ValueError naming the key and the fix."""
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
