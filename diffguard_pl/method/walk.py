"""The walk: DDIM inversion and guided synthesis of a batch, every sample on its own schedule.

Every sample is inverting, synthesising or done, on the levels of a :class:`~diffguard_pl.method.ddim.Ladder`. Each
iteration makes one denoiser call over every row still at work, then one synthesis step over the synthesising
rows and one inversion step over the inverting rows (they share one level). A sample that the adaptive early
stop (diffguard_pl/method/aes.py) stops starts its synthesis while others keep inverting. Bookkeeping (phase, level,
depth) lives on the CPU, so scheduling never waits for the device; while all rows are in one phase at one level,
they are used as they are and the step coefficients are scalars (no gathers): the fast case of the same steps.

Synthesis step (level k -> k - 1, eps at level k): classifier-free guidance eps_u + omega (eps_c - eps_u) inside
the DSG mask, or classifier guidance (diffguard_pl/method/guidance.py), on the eps re-derived from the clipped x0 where
``diffguard.clip_x0`` asks; the unguided reference takes the same step without guidance. Inversion step
(k -> k + 1, eps at the ladder's inversion level), then the early-stop rule on the inversion's quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from diffguard_pl.method.aes import AdaptiveEarlyStop
from diffguard_pl.config import DiffGuardConfig
from diffguard_pl.method.ddim import Ladder, ddim_step, denoised
from diffguard_pl.method.guidance import CutoutPlan, classifier_free_eps, guided_eps
from diffguard_pl.models.classifier import Classifier
from diffguard_pl.models.diffusion import DiffusionModel
from diffguard_pl.method.runtime import Runtime

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


class Walker:
    """Runs walks for one diffusion model, classifier and config (the pipeline's engine).

    ``hook(kind, *inputs)`` is called before each model call; ``on_step(iteration, most)`` after each iteration.
    """

    def __init__(self, diffusion: DiffusionModel, classifier: Classifier, cfg: DiffGuardConfig, ladder: Ladder,
                 runtime: Runtime, aes: Optional[AdaptiveEarlyStop], hook: Callable[..., None]):
        self.diffusion, self.classifier, self.cfg, self.ladder = diffusion, classifier, cfg, ladder
        self.runtime, self.aes, self._hook = runtime, aes, hook
        self.classifier_free = cfg.guidance.mode == "classifier_free"
        self.on_step: Optional[Callable[[int, int], None]] = None
        self._finite: List[torch.Tensor] = []  # per denoiser call of a run: eps all finite (read once)
        self._constants: dict = {}  # (value, n, device) -> long tensor (timesteps, null labels)

    @property
    def device(self) -> torch.device:
        return self.runtime.device or next(self.classifier.parameters()).device

    def run(self, x0: torch.Tensor, ids: Sequence[str], labels: Optional[torch.Tensor], with_reference: bool,
            latent: Optional[torch.Tensor] = None, depth: Optional[torch.Tensor] = None, invert_only: bool = False,
            masks: Optional[torch.Tensor] = None) -> dict:
        """Invert and synthesise every sample on its own schedule, all in shared denoiser batches.

        Inversion stops after ``diffguard.depth`` steps, or earlier by the AES rule; synthesis starts at the
        level the inversion reached (see :class:`~diffguard_pl.method.ddim.Ladder`). With ``latent`` and ``depth``
        (an earlier inversion) only the synthesis runs; with ``invert_only`` only the inversion. Returns
        model-space ``synthesis`` and ``reference``, per-sample ``depth``, ``latent`` and the per-step
        ``curves`` of the inversion.
        """
        if self.aes is None:
            raise RuntimeError("this pipeline was built with dry_run=True and cannot run")
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
        if bool((levels == levels[0]).all()):
            level: Union[int, torch.Tensor] = int(levels[0])
        else:
            level = levels.to(self.device, non_blocking=True)
        every = len(idx) == len(walk.phase)
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
        """The step coefficients (diffguard_pl/method/ddim.py) of ``level`` in ``like``'s dtype, shaped to broadcast over
        its rows."""
        _, *columns = self.ladder.on(self.device, like.dtype)
        shape = (1,) * like.ndim if isinstance(level, int) else (-1,) + (1,) * (like.ndim - 1)
        return tuple(c[level].view(shape) for c in columns)

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
        return denoised(x, eps, coef, clip_x0=True)[1]

    def _synthesis_step(self, walk: Walk, rows: Rows, eps: torch.Tensor, extra: Dict[str, torch.Tensor]) -> None:
        """Level k -> k - 1 (eps at level k) for ``rows``: guided, clipped as configured; the reference unguided."""
        guidance, clip = self.cfg.guidance, self.cfg.clip_x0 != "none"
        x = _take(walk.x, rows.device)
        coef_t, coef_s = self._coef(rows.level, x), self._coef(rows.level - 1, x)
        if self.classifier_free:
            with self.runtime.grad_free():
                eps = classifier_free_eps(eps, extra["uncond"], guidance.classifier_free.omega,
                                          _take(walk.masks, rows.device) if walk.masks is not None else None)
        clip_step = clip
        if not self.classifier_free and guidance.scale != 0:  # outside inference mode: the classifier's gradient
            crops = None if walk.crops is None else walk.crops.at(rows.device, rows.level, self.device)
            labels = _take(walk.labels, rows.device)
            self._hook("guidance", x, labels, crops)
            base = self._clipped(x, eps, coef_t) if clip else eps  # the guidance is added to the clipped eps
            with self.runtime.autocast(self.device):
                eps = guided_eps(eps, x, None, labels, self.classifier, guidance, crops, coef_t, base=base)
            clip_step = False  # the guided x0 is not clipped again (guided-diffusion's condition_score)
        with self.runtime.grad_free():
            _put(walk.x, rows.device, ddim_step(x, eps, None, None, clip_step, coef_t=coef_t, coef_s=coef_s))
            if walk.reference is not None:
                ref = _take(walk.reference, rows.device)
                _put(walk.reference, rows.device,
                     ddim_step(ref, extra["reference"], None, None, clip, coef_t=coef_t, coef_s=coef_s))
        walk.level[rows.cpu] -= 1
        walk.phase[rows.cpu[walk.level[rows.cpu] == 0]] = DONE

    def _inversion_step(self, walk: Walk, rows: Rows, eps: torch.Tensor, invert_only: bool) -> None:
        """Level k -> k + 1 for ``rows`` (all at one level), then the early-stop rule."""
        k = int(walk.level[rows.cpu[0]])
        x = _take(walk.x, rows.device)
        with self.runtime.grad_free():
            coef_t, coef_s = self._coef(k, x), self._coef(k + 1, x)
            clip = self.cfg.clip_x0 == "both" and k > self.ladder.start
            x = ddim_step(x, eps, None, None, clip, coef_t=coef_t, coef_s=coef_s)
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
            every = len(stopped) == len(walk.phase)
            stopped_d = None if every else stopped.to(self.device, non_blocking=True)
            _put(walk.latent, stopped_d, _take(walk.x, stopped_d))
            if walk.reference is not None:
                _put(walk.reference, stopped_d, _take(walk.x, stopped_d))
        walk.phase[stopped] = DONE if invert_only else SYNTHESISE
        walk.level[stopped] = self.ladder.synthesis_start(walk.depth[stopped])
