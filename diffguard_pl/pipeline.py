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

Execution (``diffguard.runtime``, see :class:`~diffguard_pl.config.RuntimeConfig`): the
pipeline applies the settings itself, so plain-Python use gets them too:
autocast of the model forwards (DDIM arithmetic, guidance arithmetic, masks and
distances stay in float32), channels-last models, an optionally compiled
denoiser, cudnn.benchmark on CUDA, and the work that needs no gradient under
``torch.inference_mode``. The per-sample bookkeeping (phase, level, depth)
lives on the CPU, so scheduling the next batch never waits for the device,
and rows are only gathered and scattered when the samples of a batch are in
different phases.

Levels: the input is level -1 (alpha_bar = 1). Inversion step k goes from
level t_{k-1} to t_k with eps evaluated at timestep t_k; synthesis step from
t_k to t_{k-1} evaluates eps at t_k. So both directions use the same
timestep embedding for the same pair of levels, and synthesis begins at the
level t_{depth-1} the inversion reached.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch

from diffguard_pl.aes import AdaptiveEarlyStop
from diffguard_pl.config import DiffGuardConfig
from diffguard_pl.ddim import alpha_bar, ddim_step, spaced_timesteps
from diffguard_pl.cam import dsg_mask, grad_cam
from diffguard_pl.guidance import at_least_float32, cfg_eps, crop_affine, cutout_params, guided_eps
from diffguard_pl.models.classifier import Classifier
from diffguard_pl.models.diffusion import NONFINITE_EPS, DiffusionModel
from diffguard_pl.scores import (
    CLASSIFIER, PIXEL, check_perceptual_files, classifier_distances, perceptual_from, pixel_distances,
)

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _select(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``t[rows]``; ``rows`` None means every row, in order (no copy)."""
    return t if rows is None else t[rows]


def _assign(t: torch.Tensor, rows: Optional[torch.Tensor], value: torch.Tensor) -> None:
    """``t[rows] = value`` in place; ``rows`` None means every row."""
    if rows is None:
        t.copy_(value)
    else:
        t[rows] = value


def _normal(t: torch.Tensor) -> torch.Tensor:
    """A tensor made under inference mode as an ordinary tensor (usable by autograd and in-place ops)."""
    return t.clone() if t.is_inference() else t


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
        self.runtime = cfg.runtime
        self.timesteps = spaced_timesteps(diffusion.num_train_timesteps, cfg.num_steps)[: cfg.depth]
        self._tables: dict = {}  # per device: level -> (timestep, alpha_bar), not rebuilt every step
        # The same table on the CPU, where the per-sample levels live: index = level + 1 (0 = the clean level).
        self._cpu_timesteps = torch.cat([torch.tensor([-1]), self.timesteps])
        self._cpu_alphas = alpha_bar(self.diffusion.alphas_cumprod.cpu(), self._cpu_timesteps)
        self._prepared = False  # channels_last / compile applied to the models
        self._run_device: Optional[torch.device] = None  # set while a run is in progress
        self._finite: List[torch.Tensor] = []  # per denoiser call of the current run: eps all finite (device)
        self._full_cache: dict = {}  # (value, n, device) -> constant long tensor (timesteps, null labels)
        # load_perceptual=False (dry runs: the pipeline cannot run) checks the DISTS / LPIPS files, loads nothing.
        self.perceptual = perceptual_from(cfg.distances, cfg.perceptual_size, load_perceptual)
        if load_perceptual:
            self.aes = AdaptiveEarlyStop(cfg.aes, cfg.perceptual_size)
        else:
            check_perceptual_files(["dists"] if cfg.aes.enabled and cfg.aes.dists is not None else [])

    @property
    def device(self) -> torch.device:
        """The models' device (looked up once per run while one is in progress: the models cannot move then)."""
        if self._run_device is not None:
            return self._run_device
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

    # ------------------------------------------------------------------ runtime

    def grad_free(self):
        """Context of work without gradients: ``torch.inference_mode`` (``runtime.inference_mode``) or ``no_grad``."""
        return torch.inference_mode() if self.runtime.inference_mode else torch.no_grad()

    def autocast(self):
        """``torch.autocast`` for the model forwards (``runtime.autocast``); none: no context (an outer one holds)."""
        dtype = AUTOCAST_DTYPES[self.runtime.autocast]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare_models(self) -> None:
        """Apply ``runtime.channels_last`` and ``runtime.compile`` to the models, once."""
        if self._prepared:
            return
        self._prepared = True
        if self.runtime.channels_last:
            for module in (self.diffusion.unet, self.diffusion.vae, self.classifier):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if self.runtime.compile and getattr(self.diffusion.unet, "_compiled_call_impl", None) is None:
            self.diffusion.unet.compile()  # in place: the same module object, state dict and config

    @contextlib.contextmanager
    def runtime_context(self):
        """Settings that hold while the pipeline runs: the prepared models and, on CUDA, cudnn.benchmark.

        cudnn.benchmark stays off when deterministic algorithms are requested
        (``trainer.deterministic``); the previous value is restored afterwards.
        """
        self.prepare_models()
        outer_device = self._run_device
        self._run_device = next(self.classifier.parameters()).device
        before = torch.backends.cudnn.benchmark
        if self._run_device.type == "cuda":
            deterministic = torch.are_deterministic_algorithms_enabled()
            torch.backends.cudnn.benchmark = self.runtime.cudnn_benchmark and not deterministic
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before
            self._run_device = outer_device

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

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
        with self.autocast():
            logits, feats = self.classifier.forward_with_features(self._model_input(images01))
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
        with self.runtime_context():
            return self._run(x0, ids, labels, with_reference, latent, depth, invert_only, masks)

    def _rows(self, idx: torch.Tensor, n: int) -> Optional[torch.Tensor]:
        """CPU row indices (sorted, unique) as a device index tensor; None when they are all ``n`` rows."""
        return None if len(idx) == n else idx.to(self.device, non_blocking=True)

    def _alphas(self, level: torch.Tensor) -> torch.Tensor:
        """alpha_bar (float64) at CPU level indices, on the device."""
        return self._cpu_alphas[level + 1].to(self.device, non_blocking=True)

    def _null(self, n: int) -> Optional[torch.Tensor]:
        """The null class for ``n`` rows of a conditional model (None for an unconditional one)."""
        if not self.diffusion.conditional:
            return None
        return torch.full((n,), self.diffusion.null_class, dtype=torch.long, device=self.device)

    def _eps(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The denoiser's eps; its NaN / Inf check is collected as a device flag and read once, after the run."""
        eps = self.diffusion.eps(x, t, class_labels, check_finite=False)
        self._finite.append(torch.isfinite(eps).all())
        return eps

    def _full(self, value: int, n: int) -> torch.Tensor:
        """A cached device tensor of ``n`` copies of the integer ``value`` (timesteps, labels, depths)."""
        key = (value, n, self.device)
        if key not in self._full_cache:
            if len(self._full_cache) > 4096:
                self._full_cache.clear()
            self._full_cache[key] = torch.full((n,), value, dtype=torch.long, device=self.device)
        return self._full_cache[key]

    def _run_uniform(self, x, x0, x_ref, latent, labels, masks, crops, curves, phase, level, depth_cpu,
                     invert_only, extra, aes_on_device) -> None:
        """The iterations in which every sample is in the same phase at the same level, without gathers.

        The same arithmetic as the general loop of :meth:`_run` (bit for bit), with one level for all rows:
        timesteps and alpha_bar come from cached device tensors, rows need no gathering or scattering, and
        nothing waits for the device unless the AES rule reads device values. Returns when every sample is
        done, or updates ``phase`` / ``level`` / ``depth`` for the general loop when AES stops only some.
        """
        n, cap = x.shape[0], len(self.timesteps)
        alphas = self._level_table(self.device)[1]  # float64, index level + 1
        # sqrt(alpha_bar) and sqrt(1 - alpha_bar) of every level, in x's dtype, computed once for the run
        # (what each step would compute from alpha_bar, to the bit; a step then launches no scalar arithmetic).
        root_a, root_1ma = alphas.sqrt().to(x.dtype), (1 - alphas).sqrt().to(x.dtype)  # as in step_coefficients
        shape = (1,) * x.ndim
        coef = [(root_a[i].view(shape), root_1ma[i].view(shape)) for i in range(cap + 1)]

        def c(k: int) -> tuple:
            return coef[k + 1]  # one value for every row

        conditional, label_free = self.diffusion.conditional, self.diffusion.null_class is None
        null = self._full(self.diffusion.null_class, n) if conditional and not label_free else None
        u_phase, k = int(phase[0]), int(level[0])
        syn_labels = null if labels is None else labels
        syn_conds = None
        guidance = self.cfg.guidance
        while u_phase < 2:
            if u_phase == 0:  # inversion: level k -> k + 1, eps at t_{k+1}
                with self.grad_free():
                    class_labels = (labels if label_free else null) if conditional else None
                    t = self._full(int(self._cpu_timesteps[k + 2]), n)
                    with self.autocast():
                        eps = self._eps(self._model_input(x), t, class_labels)
                    x.copy_(ddim_step(x, eps.to(x.dtype), None, None, coef_t=c(k), coef_s=c(k + 1)))
                    quality = self.aes.quality(x, x0)
                    for name, value in quality.items():
                        curves[name][:, k + 1] = value.to(curves[name].dtype)
                    stop = self.aes.should_stop(quality, self._full(k + 2, n), cap).cpu() if aes_on_device else None
                k += 1
                if stop is None:
                    every, some = k + 1 >= cap, k + 1 >= cap
                else:
                    every, some = bool(stop.all()), bool(stop.any())
                if every:
                    depth_cpu.fill_(k + 1)
                    with self.grad_free():
                        latent.copy_(x)
                        if x_ref is not None:
                            x_ref.copy_(x)
                    u_phase = 2 if invert_only else 1
                elif some:  # only some samples stop: the general loop takes over
                    level.fill_(k)
                    stopped = stop.nonzero().flatten()
                    phase[stopped], depth_cpu[stopped] = (2 if invert_only else 1), k + 1
                    stopped_d = self._rows(stopped, n)
                    with self.grad_free():
                        _assign(latent, stopped_d, _select(x, stopped_d))
                        if x_ref is not None:
                            _assign(x_ref, stopped_d, _select(x, stopped_d))
                    return
            else:  # synthesis: level k -> k - 1, eps at t_k
                parts = 1 + len(extra)
                with self.grad_free():
                    rows = [x] + [x_ref if name == "reference" else x for name in extra]
                    batch = self._model_input(x if parts == 1 else torch.cat(rows))
                    t = self._full(int(self._cpu_timesteps[k + 1]), n * parts)
                    if conditional and syn_conds is None:
                        twins = labels if label_free else null
                        syn_conds = syn_labels if parts == 1 else torch.cat([syn_labels] + [twins] * len(extra))
                    with self.autocast():
                        eps = self._eps(batch, t, syn_conds if conditional else None)
                    eps = eps.to(x.dtype)
                eps_syn, *eps_rest = eps.split(n) if parts > 1 else [eps]
                eps_extra = dict(zip(extra, eps_rest))
                coef_t, coef_s = c(k), c(k - 1)
                if self.cfg_mode:
                    with self.grad_free():
                        eps_syn = cfg_eps(eps_syn, eps_extra["uncond"], guidance.cfg.omega, masks)
                elif guidance.scale != 0:
                    if crops is not None and crops.device != self.device:
                        crops = crops.to(self.device)  # one copy, then a view per step
                    step_crops = None if crops is None else crops[:, k]
                    with self.autocast():
                        eps_syn = guided_eps(eps_syn, x, None, labels, self.classifier, guidance, step_crops, coef_t)
                with self.grad_free():
                    x.copy_(ddim_step(x, eps_syn, None, None, self.cfg.clip_x0, coef_t, coef_s))
                    if x_ref is not None:
                        x_ref.copy_(ddim_step(x_ref, eps_extra["reference"], None, None, self.cfg.clip_x0,
                                              coef_t, coef_s))
                k -= 1
                if k < 0:
                    u_phase = 2
        phase.fill_(2)
        level.fill_(k)

    def _run(self, x0, ids, labels, with_reference, latent, depth, invert_only, masks) -> dict:
        self._finite = []
        try:
            out = self._run_steps(x0, ids, labels, with_reference, latent, depth, invert_only, masks)
            if self._finite and not bool(torch.stack(self._finite).all()):  # the run's one read of these flags
                raise FloatingPointError(NONFINITE_EPS)
        finally:
            self._finite = []
        return out

    def _run_steps(self, x0, ids, labels, with_reference, latent, depth, invert_only, masks) -> dict:
        n, cap = x0.shape[0], len(self.timesteps)
        device = self.device
        guidance = self.cfg.guidance
        guide = not self.cfg_mode and guidance.scale != 0  # guided_eps returns eps unchanged at scale 0
        use_crops = guide and guidance.cutout.num > 0
        # Crop maps [N, cap, K, 2, 3] for every step, on the CPU (the uniform loop copies them once).
        crops = crop_affine(cutout_params(ids, cap, guidance.cutout, self.cfg.seed)).to(x0.dtype) if use_crops else None
        conditional = self.diffusion.conditional
        # Labels of rows that run "without a label" (inversion, CFG twins, reference): see _unconditional.
        label_free = conditional and self.diffusion.null_class is None
        if label_free and labels is None:
            self._unconditional(None, torch.empty(0))  # raises: such a model needs labels
        # Bookkeeping on the CPU: which rows invert (phase 0), synthesise (1) or are done (2), and their levels.
        if latent is None:
            x = x0.clone()
            level = torch.full((n,), -1, dtype=torch.long)
            phase = torch.zeros(n, dtype=torch.long)
            depth_cpu = torch.zeros(n, dtype=torch.long)
            latent = torch.empty_like(x0)
            depth_out = None
        else:
            x = latent.clone()
            depth_cpu = depth.cpu().clone()
            level, phase = depth_cpu - 1, torch.ones(n, dtype=torch.long)
            depth_out = depth
        x_ref = x.clone() if with_reference else None
        curves = {name: torch.full((n, cap), float("nan"), device=device) for name in self.aes.curve_names}
        extra = (["uncond"] if self.cfg_mode else []) + (["reference"] if with_reference else [])
        aes_on_device = bool(self.aes.thresholds)  # the stop rule reads device values (else only the depth)
        if n and bool((phase == phase[0]).all() and (level == level[0]).all()):
            self._run_uniform(x, x0, x_ref, latent, labels, masks, crops, curves, phase, level, depth_cpu,
                              invert_only, extra, aes_on_device)

        # The general case: samples in different phases or at different levels (adaptive early stop).
        while True:
            inv, syn = (phase == 0).nonzero().flatten(), (phase == 1).nonzero().flatten()
            ni, ns = len(inv), len(syn)
            if ni + ns == 0:
                break
            inv_d, syn_d = self._rows(inv, n), self._rows(syn, n)
            lev_inv, lev_syn = level[inv], level[syn]
            syn_labels = None if labels is None or ns == 0 else _select(labels, syn_d)

            # One denoiser call: inverting rows (null class), synthesising rows (label), with CFG their
            # unconditional twins (null class), and reference rows (null class).
            with self.grad_free():
                rows, steps, conds, sizes = [], [], [], []
                if ni:
                    rows.append(_select(x, inv_d))
                    steps.append(lev_inv + 1)
                    conds.append(_select(labels, inv_d) if label_free else self._null(ni))
                if ns:
                    x_syn = _select(x, syn_d)
                    rows.append(x_syn)
                    steps.append(lev_syn)
                    conds.append(syn_labels if syn_labels is not None else self._null(ns))
                    for name in extra:
                        rows.append(_select(x_ref, syn_d) if name == "reference" else x_syn)
                        steps.append(lev_syn)
                        conds.append(syn_labels if label_free else self._null(ns))
                sizes = [len(r) for r in rows]
                batch = self._model_input(rows[0] if len(rows) == 1 else torch.cat(rows))
                t = self._cpu_timesteps[torch.cat(steps) + 1].to(device, non_blocking=True)
                class_labels = (conds[0] if len(conds) == 1 else torch.cat(conds)) if conditional else None
                with self.autocast():
                    eps = self._eps(batch, t, class_labels)
                eps = eps.to(x.dtype)
            parts = list(eps.split(sizes)) if len(sizes) > 1 else [eps]
            eps_inv = parts.pop(0) if ni else None
            eps_syn = parts.pop(0) if ns else None
            eps_extra = dict(zip(extra, parts))

            if ns:
                a_t, a_s = self._alphas(lev_syn), self._alphas(lev_syn - 1)
                if self.cfg_mode:
                    with self.grad_free():
                        step_masks = None if masks is None else _select(masks, syn_d)
                        eps_syn = cfg_eps(eps_syn, eps_extra["uncond"], guidance.cfg.omega, step_masks)
                elif guide:
                    # Outside inference mode: the gradient of the classifier with respect to x_clean.
                    step_crops = None if crops is None else crops[syn, lev_syn].to(device, non_blocking=True)
                    with self.autocast():
                        eps_syn = guided_eps(eps_syn, _select(x, syn_d), a_t, syn_labels, self.classifier,
                                             guidance, step_crops)
                clip = self.cfg.clip_x0
                with self.grad_free():
                    _assign(x, syn_d, ddim_step(_select(x, syn_d), eps_syn, a_t, a_s, clip))
                    if with_reference:
                        _assign(x_ref, syn_d, ddim_step(_select(x_ref, syn_d), eps_extra["reference"], a_t, a_s, clip))
                level[syn] -= 1
                phase[syn[level[syn] < 0]] = 2

            if ni:
                with self.grad_free():
                    x_inv = ddim_step(_select(x, inv_d), eps_inv, self._alphas(lev_inv), self._alphas(lev_inv + 1))
                    _assign(x, inv_d, x_inv)
                    level[inv] += 1
                    reached = level[inv]
                    quality = self.aes.quality(x_inv, _select(x0, inv_d))
                    if quality:
                        if bool((reached == reached[0]).all()):  # the usual case: one column
                            index = (slice(None) if inv_d is None else inv_d, int(reached[0]))
                        else:
                            rows_d = torch.arange(n, device=device) if inv_d is None else inv_d
                            index = (rows_d, reached.to(device, non_blocking=True))
                        for name, value in quality.items():
                            curves[name][index] = value.to(curves[name].dtype)
                    if aes_on_device:
                        stop = self.aes.should_stop(quality, (reached + 1).to(device), cap).cpu()
                    else:
                        stop = self.aes.should_stop(quality, reached + 1, cap)
                stopped = inv[stop]
                if len(stopped):
                    phase[stopped], depth_cpu[stopped] = (2 if invert_only else 1), level[stopped] + 1
                    stopped_d = self._rows(stopped, n)
                    with self.grad_free():
                        _assign(latent, stopped_d, _select(x, stopped_d))
                        if with_reference:
                            _assign(x_ref, stopped_d, _select(x, stopped_d))
        depth_out = depth_cpu.to(device) if depth_out is None else depth_out
        return {"synthesis": x, "reference": x_ref, "depth": depth_out, "latent": latent, "curves": curves}

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
        with self.runtime_context():
            return self._call(images, list(ids), oracle_labels)

    def _call(self, images: torch.Tensor, ids: List[str], oracle_labels: Optional[torch.Tensor]) -> dict:
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

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to model space (the autoencoder under the runtime's autocast), in the images' dtype."""
        if not self.diffusion.latent:
            return images
        with self.grad_free(), self.autocast():
            z = self.diffusion.encode(self._model_input(images))
        return _normal(z.to(images.dtype))

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        """Model space (images or latents) to images in [0, 1]."""
        if self.diffusion.latent:
            with self.grad_free(), self.autocast():
                decoded = self.diffusion.decode(self._model_input(z))
            decoded = decoded.to(z.dtype)  # outside inference mode: the results below are ordinary tensors
        else:
            decoded = z
        return ((decoded + 1) / 2).clamp(0, 1)

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
