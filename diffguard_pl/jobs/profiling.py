"""Measuring the machine and the pipeline's model calls.

The machine: device synchronisation, best-of timings, peak memory, and the dense matrix-product rate that
speed figures are compared with (evaluate.py prints it beside its timing; benchmarks/throughput.py uses it
for the FLOP floor).

The model calls: :class:`Recorder` records the calls a pipeline run makes (through the pipeline's
``on_model_call`` hook), :class:`Replay` runs them again on random inputs of the same shapes with nothing in
between (the unavoidable model time), times them by group and counts their FLOPs; :func:`bare_model_times`
times single calls at a batch size. benchmarks/throughput.py measures the pipeline against them.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from typing import TYPE_CHECKING, Dict, Optional

import torch

from diffguard_pl.method.cam import grad_cam
from diffguard_pl.method.guidance import at_least_float32

if TYPE_CHECKING:
    from diffguard_pl.method.pipeline import DiffGuardPipeline


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on a CPU (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


COMPUTE_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matrix-product rate (FLOP/s) in ``dtype``: the best of five timings at two sizes.

    Each timing repeats the product for at least about 4 GFLOP (CPU) or 10 TFLOP (CUDA), so short products
    are not dominated by the timer.
    """
    sizes, work = ((4096, 8192), 1e13) if device.type == "cuda" else ((1024, 2048), 4e9)
    g = torch.Generator().manual_seed(0)
    # On CUDA, float32 convolutions run in TF32 by default (cudnn.allow_tf32): rate the products the same way.
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or before
    try:
        return _best_matmul_rate(device, dtype, sizes, work, g)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _best_matmul_rate(device, dtype, sizes, work, g) -> float:
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
        reps = max(1, round(work / (2 * n**3)))

        def run(a=a, b=b, reps=reps):
            for _ in range(reps):
                torch.mm(a, b)

        best = max(best, 2 * n**3 * reps / best_time(run, device, repeats=5))
    return best


def describe_machine(device: torch.device) -> dict:
    """The device and its fp32 matrix-product rate (GFLOP/s), measured now (about a second on a CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "threads": torch.get_num_threads(),
            "fp32_matmul_gflops": matmul_rate(device, torch.float32) / 1e9}


# --------------------------------------------------------------------------- recording and replaying model calls


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
