"""Tensor operations per denoiser call, inside and outside the model calls, for the embedded presets.

    python -m benchmarks.perf.op_count [--batch-size 64]

On a GPU running small models every operation is a kernel launch of a few microseconds whatever its
size, so the operations the pipeline adds around the model calls (DDIM arithmetic, guidance, curves,
bookkeeping) bound its overhead there. This script counts them on any device with a dispatch mode:
every ATen call except views and metadata, split into those made inside the denoiser, the classifier
(forward and the guidance gradient) and those outside. On a CPU the outside count also holds the few
host-side bookkeeping operations per step (levels, timesteps, cutout draws), which a GPU runs on the host.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffguard_pl.api import load_preset
from diffguard_pl.data import build_benchmark
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.method.pipeline import DiffGuardPipeline

PATHS = {  # name: (preset, overrides)
    "gdm": ("digits_gdm", []),
    "gdm_aes": ("digits_gdm", ["diffguard.aes.enabled=true", "diffguard.aes.psnr=7.8"]),
    "classifier_free_dsg": ("digits_classifier_free", []),
}
METADATA = {"detach", "lift_fresh", "_local_scalar_dense", "empty", "empty_strided", "set_"}


class OpCounter(TorchDispatchMode):
    """Counts ATen calls that do work (not views, not metadata), inside or outside the model calls."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a model call runs
        self.counts: Counter = Counter()
        self.outside: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in METADATA:
            self.counts["model" if self.depth else "outside"] += 1
            if not self.depth:
                self.outside[name] += 1
        return func(*args, **(kwargs or {}))

    def inside(self, fn, name: str):
        """``fn`` with its operations counted as model operations (and its calls as ``name``)."""
        def wrapped(*args, **kwargs):
            self.calls[name] += 1
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return wrapped


def count(pipe: DiffGuardPipeline, images: torch.Tensor, ids: list) -> dict:
    pipe(images, ids)  # warm-up: lazy initialisation is not counted
    counter = OpCounter()
    originals = (pipe.diffusion.unet.forward, pipe.classifier.forward, torch.autograd.grad)
    pipe.diffusion.unet.forward = counter.inside(originals[0], "denoiser")
    pipe.classifier.forward = counter.inside(originals[1], "classifier")
    torch.autograd.grad = counter.inside(originals[2], "gradient")  # the guidance gradient's backward pass
    try:
        with counter:
            pipe(images, ids)
    finally:
        del pipe.diffusion.unet.forward, pipe.classifier.forward
        torch.autograd.grad = originals[2]
    calls = counter.calls["denoiser"]
    return {"denoiser_calls": calls, "model_ops": counter.counts["model"], "outside_ops": counter.counts["outside"],
            "outside_per_call": counter.counts["outside"] / calls, "model_per_call": counter.counts["model"] / calls,
            "top_outside": counter.outside.most_common(12), "outside_by_op": dict(counter.outside)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    report = {}
    for name, (preset, overrides) in PATHS.items():
        cfg = load_preset(preset, *overrides)
        pipe = DiffGuardPipeline(load_diffusion(cfg.models.diffusion), load_classifier(cfg.models.classifier),
                                 cfg.diffguard).to(args.device)
        test = build_benchmark(cfg.data).test
        images, ids = test.images[: args.batch_size].to(args.device), test.ids[: args.batch_size]
        report[name] = result = count(pipe, images, ids)
        print(f"{name}: {result['denoiser_calls']} denoiser calls for a batch of {len(ids)}; per call "
              f"{result['outside_per_call']:.1f} operations outside the models, {result['model_per_call']:.1f} "
              f"inside; most frequent outside: "
              + ", ".join(f"{op} {n}" for op, n in result["top_outside"][:8]), flush=True)
    return report


if __name__ == "__main__":
    main()
