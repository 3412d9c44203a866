"""Recording and replaying the pipeline's model calls.

:class:`Recorder` records the calls a pipeline run makes (through the pipeline's ``on_model_call`` hook),
:class:`Replay` runs them again on random inputs of the same shapes with nothing in between (the unavoidable model
time), times them by group and counts their FLOPs; :func:`bare_model_times` times single calls at a batch size.
benchmarks/perf/throughput.py measures the pipeline against them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Dict, Optional

import torch

from diffguard_pl.method.cam import grad_cam
from diffguard_pl.method.guidance import at_least_float32
from diffguard_pl.profiling.machine import best_time, sync

if TYPE_CHECKING:
    from diffguard_pl.method.pipeline import DiffGuardPipeline


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel (not in torch's table): the two products q k^T and p v."""
    b, h, s_q, d = query
    return 2 * b * h * s_q * key[-2] * (d + value[-1])


class Recorder:
    """Records the model calls of pipeline runs as events (kind, input shape, ...) in call order, through the
    pipeline's model-call hook (and a classifier pre-hook for the guidance crops' shape)."""

    def __init__(self, pipe: DiffGuardPipeline):
        self.pipe, self.events = pipe, []
        self._guiding = False
        self._undo: list = []

    def _on_call(self, kind: str, inputs: tuple) -> None:
        shape = tuple(inputs[0].shape)
        if kind == "denoiser":
            self.events.append(("unet", shape, inputs[2] is not None))
        elif kind == "guidance":
            self._guiding = True  # the classifier's next forward takes the crops
        elif kind == "grad_cam":
            self.events.append(("cam", shape, self.pipe.cfg.guidance.classifier_free.cam_layer))
        elif kind == "classifier":
            self.events.append(("classify", shape))
        else:  # encode, decode
            self.events.append((kind, shape))

    def _on_classifier(self, _module, args) -> None:
        if self._guiding:
            self.events.append(("guide", tuple(args[0].shape)))
            self._guiding = False

    def __enter__(self) -> "Recorder":
        self.pipe.on_model_call = self._on_call
        handle = self.pipe.classifier.register_forward_pre_hook(self._on_classifier)
        self._undo = [handle.remove, lambda: setattr(self.pipe, "on_model_call", None)]
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


class Replay:
    """Runs the recorded model calls again on random inputs of the same shapes, with nothing in between."""

    def __init__(self, pipe: DiffGuardPipeline, events: list, seed: int = 0):
        self.pipe, self.events = pipe, events
        self.device = pipe.device
        self._inputs: dict = {}
        self._generator = torch.Generator().manual_seed(seed)

    def _rand(self, shape, kind: str = "normal") -> torch.Tensor:
        fill = torch.rand if kind == "uniform" else torch.randn
        x = fill(shape, generator=self._generator).to(self.device)
        if self.pipe.runtime.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _labels(self, n: int, num_classes: int) -> torch.Tensor:
        return torch.randint(0, num_classes, (n,), generator=self._generator).to(self.device)

    def inputs(self, event: tuple):
        if event not in self._inputs:
            kind, shape = event[0], event[1]
            diffusion, classes = self.pipe.diffusion, self.pipe.classifier.spec.num_classes
            if kind == "unet":
                t = torch.randint(0, diffusion.num_train_timesteps, (shape[0],), generator=self._generator)
                labels = self._labels(shape[0], diffusion.num_classes) if event[2] else None
                value = (self._rand(shape), t.to(self.device), labels)
            elif kind in ("guide", "cam"):
                value = (self._rand(shape, "uniform"), self._labels(shape[0], classes))
            elif kind == "classify":
                value = (self._rand(shape, "uniform"),)
            else:  # encode: images in [-1, 1]; decode: latents
                value = (self._rand(shape, "uniform") * 2 - 1 if kind == "encode" else self._rand(shape),)
            self._inputs[event] = value
        return self._inputs[event]

    def prepare(self) -> None:
        """Draw the random inputs of every recorded call now (outside any timing)."""
        for event in self.events:
            self.inputs(event)

    def run_event(self, event: tuple, counting: bool = False) -> None:
        """Run one recorded call.

        ``counting``: under the FLOP counter, whose module tracker cannot hook a leaf that ``autograd.grad``
        differentiates, so the crops go through one copy first (no FLOPs).
        """
        pipe, kind = self.pipe, event[0]
        args = self.inputs(event)
        if kind == "unet":
            x, t, labels = args
            with pipe.runtime.grad_free(), pipe.runtime.autocast(pipe.device):
                pipe.diffusion.unet(x, t, class_labels=labels)
        elif kind == "guide":
            crops, labels = args
            with torch.enable_grad(), pipe.runtime.autocast(pipe.device):
                leaf = crops.detach().requires_grad_(True)
                logits = pipe.classifier(leaf.clone() if counting else leaf)
                log_probs = torch.log_softmax(at_least_float32(logits), dim=1)
                torch.autograd.grad(log_probs.gather(1, labels.view(-1, 1)).sum(), leaf)
        elif kind == "cam":
            images, labels = args
            grad_cam(pipe.classifier, images, labels, event[2])  # float32, as in the pipeline
        elif kind == "classify":
            with torch.no_grad(), pipe.runtime.autocast(pipe.device):
                pipe.classifier.forward_with_features(args[0])
        else:
            with pipe.runtime.grad_free(), pipe.runtime.autocast(pipe.device):
                getattr(pipe.diffusion.vae, kind)(args[0])

    def __call__(self, kinds: Optional[set] = None) -> None:
        with self.pipe.running():
            for event in self.events:
                if kinds is None or event[0] in kinds:
                    self.run_event(event)

    def flops(self) -> float:
        """FLOPs of the recorded calls: each distinct call counted once under torch's FLOP counter, times its count.

        A compiled denoiser is counted through its eager forward (the same arithmetic).
        """
        from torch.utils.flop_counter import FlopCounterMode

        mapping = {}
        cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if cpu_attention is not None:
            mapping[cpu_attention] = cpu_attention_flops
        unet = self.pipe.diffusion.unet
        compiled = getattr(unet, "_compiled_call_impl", None)
        unet._compiled_call_impl = None
        total = 0.0
        try:
            for event, times in Counter(self.events).items():
                with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                    self.run_event(event, counting=True)
                total += float(counter.get_total_flops()) * times
        finally:
            unet._compiled_call_impl = compiled
        return total

    def breakdown(self) -> Dict[str, float]:
        """Seconds per group of calls (each group replayed on its own, synchronised)."""
        groups = {"unet": {"unet"}, "classifier_guidance": {"guide"}, "grad_cam": {"cam"},
                  "classifier_forward": {"classify"}, "autoencoder": {"encode", "decode"}}
        present = {e[0] for e in self.events}
        out = {}
        for name, kinds in groups.items():
            if kinds & present:
                sync(self.device)
                start = time.perf_counter()
                self(kinds)
                sync(self.device)
                out[name] = time.perf_counter() - start
        return out


def bare_model_times(pipe: DiffGuardPipeline, batch: int, device: torch.device, repeats: int) -> dict:
    """Bare denoiser forward at ``batch`` rows and classifier forward + backward over batch x K cutout crops."""
    diffusion, spec = pipe.diffusion, pipe.classifier.spec
    shape = (batch, diffusion.in_channels, diffusion.sample_size, diffusion.sample_size)
    replay = Replay(pipe, [])
    out = {}
    event = ("unet", shape, diffusion.conditional)
    with pipe.running():
        out["bare_unet_ms"] = 1e3 * best_time(lambda: replay.run_event(event), device, repeats)
        crops = pipe.cfg.guidance.cutout.num if pipe.cfg.guidance.mode == "classifier" else 0
        if pipe.cfg.guidance.mode == "classifier":
            rows = batch * max(crops, 1)
            guide = ("guide", (rows, spec.in_chans, spec.input_size, spec.input_size))
            out["classifier_fwd_bwd_ms"] = 1e3 * best_time(lambda: replay.run_event(guide), device, repeats)
            out["classifier_rows"] = rows
        if pipe.cfg.guidance.mode == "classifier_free" and pipe.cfg.guidance.classifier_free.dsg:
            size = diffusion.image_size
            cam = ("cam", (batch, spec.in_chans, size, size), pipe.cfg.guidance.classifier_free.cam_layer)
            out["grad_cam_ms"] = 1e3 * best_time(lambda: replay.run_event(cam), device, repeats)
        if diffusion.latent:
            size = diffusion.image_size
            encode = ("encode", (batch, spec.in_chans, size, size))
            decode = ("decode", shape)
            out["encode_ms"] = 1e3 * best_time(lambda: replay.run_event(encode), device, repeats)
            out["decode_ms"] = 1e3 * best_time(lambda: replay.run_event(decode), device, repeats)
    out["bare_unet_rows"] = batch
    return out
