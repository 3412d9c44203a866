"""Timing: the pipeline against a replay of its own model calls, path by path, on one device.

In one run on one device, for each path (``--paths``) of the embedded presets (checkpoints/digits; the
paper-scale models with ``--paper-scale``: benchmarks.perf.throughput_paper):

- ``gdm``: classifier guidance (clean grad, cutout), AES off (``conf/digits_gdm.yaml``);
- ``gdm_aes``: the same with adaptive early stop (PSNR threshold 7.80 dB, calibrated on InD validation);
- ``classifier_free_dsg``: classifier-free guidance with DSG (``conf/digits_classifier_free.yaml``: the
  class-conditional model, Grad-CAM masks),

it measures the bare denoiser forward at the evaluation batch size, the classifier's forward + backward over
the configured cutout crops of that batch, and the whole pipeline (``DiffGuardPipeline.__call__``:
classification, Grad-CAM, encoding, inversion, guided synthesis, decoding, distances) per image, and prints
UNet (denoiser) evaluations per image, images/s, peak memory and

    overhead ratio = pipeline time / model time.

See benchmarks.perf.throughput_measure for what model time and the floor are.

Batch-size scaling (``--scaling 1,8,64``): images/s of the ``--scaling-path`` at each batch size (at least
``--scaling-images`` images each), with its overhead ratio.

Results go to stdout and, with ``--json FILE``, to a JSON file rewritten after every path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.perf.throughput_measure import measure
from diffguard_pl.api import load_preset
from diffguard_pl.config import EvalConfig
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.profiling.machine import COMPUTE_DTYPES, matmul_rate
from diffguard_pl.profiling.replay import bare_model_times

EMBEDDED_PATHS = {  # name: (preset, overrides)
    "gdm": ("digits_gdm", []),
    "gdm_aes": ("digits_gdm", ["diffguard.aes.enabled=true", "diffguard.aes.psnr=7.8"]),
    "classifier_free_dsg": ("digits_classifier_free", []),
}
DESCRIPTIONS = {
    "gdm": "classifier guidance + cutout, AES off",
    "gdm_aes": "classifier guidance + cutout, AES on",
    "classifier_free_dsg": "classifier-free guidance + DSG",
}


class EmbeddedSuite:
    """The embedded presets' paths: their presets, the committed models (each loaded once and shared by the paths
    that use it) and the benchmark's test images."""

    paths = EMBEDDED_PATHS

    def __init__(self):
        self._models: dict = {}
        self._benchmarks: dict = {}

    def overrides(self, preset: str, notes: List[str]) -> List[str]:
        """None: the embedded presets run as they are."""
        return []

    def models(self, path: str, cfg: EvalConfig):
        """(diffusion model, classifier) of the path's preset."""
        from diffguard_pl.models import load_classifier, load_diffusion

        classifier = self._keep(f"classifier:{cfg.models.classifier}", lambda: load_classifier(cfg.models.classifier))
        diffusion = self._keep(f"diffusion:{cfg.models.diffusion}", lambda: load_diffusion(cfg.models.diffusion))
        return diffusion, classifier.eval()

    def _keep(self, key: str, build):
        if key not in self._models:
            self._models[key] = build()
        return self._models[key]

    def images(self, cfg: EvalConfig, pipe, count: int):
        """``count`` test images, InD and every OOD set interleaved (AES stops them at different depths)."""
        from diffguard_pl.data import build_benchmark

        key = repr(cfg.data)
        if key not in self._benchmarks:
            self._benchmarks[key] = build_benchmark(cfg.data)
        benchmark = self._benchmarks[key]
        sets = [benchmark.test] + [s.test for s in benchmark.ood.values()]
        order = [(s, i) for i in range(max(len(s) for s in sets)) for s in sets if i < len(s)]
        if count > len(order):
            raise SystemExit(f"--images {count}: the embedded test sets hold {len(order)} images")
        chosen = order[:count]
        return torch.stack([s.images[i] for s, i in chosen]), [s.ids[i] for s, i in chosen]


def describe_runtime(cfg) -> str:
    """The execution settings a path ran under (diffguard.runtime), for the printout and the report."""
    r = cfg.diffguard.runtime
    return (f"autocast={r.autocast} channels_last={r.channels_last} compile={r.compile} "
            f"cudnn_benchmark={r.cudnn_benchmark} inference_mode={r.inference_mode}")


def run(args: argparse.Namespace, device: torch.device, suite, command: str) -> dict:
    """Time every path of ``suite`` (:class:`EmbeddedSuite` or the paper-scale one) on ``device``, then the batch-size
    scaling; the report (see the module docstring). ``args``: benchmarks.perf.throughput's command line;
    ``command``: that command line as text, for the report."""
    paths_table = suite.paths
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in paths_table]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {list(paths_table)}")
    repeats = args.repeats or (1 if args.paper_scale else 2)
    scaling = args.scaling if args.scaling is not None else ("" if args.paper_scale else "1,8,64")
    scaling = [] if scaling.strip().lower() == "none" else [int(b) for b in scaling.split(",") if b.strip()]
    notes: List[str] = []
    report = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "paper_scale": args.paper_scale,
        "tiny_arch": args.tiny_arch,
        "overrides": list(args.overrides),
        "command": command,
        "notes": notes,
        "paths": {},
        "scaling": {},
    }
    if device.type == "cpu":
        report["load_average"] = os.getloadavg()

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))

    quick = args.warmup == "quick" or (args.warmup is None and args.paper_scale)

    def setup(path: str, batch_override: Optional[int]):
        preset, extra = paths_table[path]
        overrides = extra + suite.overrides(preset, notes) + list(args.overrides)
        cfg = load_preset(preset, *overrides)
        diffusion, classifier = suite.models(path, cfg)
        pipe = DiffGuardPipeline(diffusion, classifier, cfg.diffguard).to(device)
        quick_pipe = None
        if quick:
            short = load_preset(preset, *overrides, f"diffguard.depth={min(2, cfg.diffguard.depth)}",
                                "diffguard.aes.min_depth=1")
            quick_pipe = DiffGuardPipeline(diffusion, classifier, short.diffguard).to(device)
        default_batch = 64 if device.type == "cpu" else cfg.data.eval_batch_size
        batch = batch_override or args.batch_size or min(default_batch, args.images or default_batch)
        return cfg, pipe, batch, quick_pipe

    rates: Dict[str, float] = {}

    def peak_rate(cfg) -> Optional[float]:
        """The matmul rate in the path's compute dtype (measured once per dtype), None with --no-floor."""
        if args.no_floor:
            return None
        name = cfg.diffguard.runtime.autocast
        if name not in rates:
            rates[name] = matmul_rate(device, COMPUTE_DTYPES[name])
            report["matmul_gflops_per_second"] = {k: v / 1e9 for k, v in rates.items()}
            print(f"  {device.type} matmul rate in {COMPUTE_DTYPES[name]}: {rates[name] / 1e9:.1f} GFLOP/s "
                  f"(dense square products, best timing"
                  f"{'; TF32 allowed, as for cuDNN convolutions' if device.type == 'cuda' and name == 'none' else ''})",
                  flush=True)
        return rates[name]

    print(f"device: {report['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", load average {report['load_average'][0]:.2f}" if device.type == "cpu" else ""), flush=True)
    measured: dict = {}
    for path in paths:
        cfg, pipe, batch, quick_pipe = setup(path, None)
        count = args.images or batch
        images, ids = suite.images(cfg, pipe, count)
        print(f"\n[{path}] {DESCRIPTIONS[path]}: {count} images, batch {batch}, {cfg.diffguard.num_steps} steps, "
              f"depth {cfg.diffguard.depth}, reference {cfg.diffguard.reference}, runtime {describe_runtime(cfg)}",
              flush=True)
        result = measure(pipe, images, ids, batch, repeats, device, breakdown=not args.no_breakdown,
                         quick_pipe=quick_pipe, peak_rate=peak_rate(cfg))
        bare = bare_model_times(pipe, batch, device, repeats=3)
        result.update(bare)
        per_row_unet = bare["bare_unet_ms"] / 1e3 / batch
        formula = result["unet_evals_per_image"] * per_row_unet
        if "classifier_fwd_bwd_ms" in bare:
            formula += result["guidance_steps_per_image"] * bare["classifier_fwd_bwd_ms"] / 1e3 / batch
        decodes = 1 + int(cfg.diffguard.reference == "unguided")
        other_ms = bare.get("grad_cam_ms", 0.0) + bare.get("encode_ms", 0.0) + decodes * bare.get("decode_ms", 0.0)
        formula += other_ms / 1e3 / batch
        result["ratio_formula"] = result["seconds_per_image"] / formula
        result["runtime"] = describe_runtime(cfg)
        result["settings"] = {"num_steps": cfg.diffguard.num_steps, "depth": cfg.diffguard.depth,
                              "reference": cfg.diffguard.reference, "cutouts": cfg.diffguard.guidance.cutout.num,
                              "aes": cfg.diffguard.aes.enabled, "record_curves": cfg.diffguard.aes.record_curves,
                              "distances": list(cfg.diffguard.distances)}
        report["paths"][path] = result
        measured[(path, batch, count)] = result
        r = result
        print(f"  UNet evaluations / image {r['unet_evals_per_image']:.1f} (mean depth {r['mean_depth']:.2f}), "
              f"guidance steps / image {r['guidance_steps_per_image']:.1f}, {r['unet_calls']} denoiser calls")
        print(f"  bare UNet forward at {batch} rows: {bare['bare_unet_ms']:.2f} ms "
              f"({bare['bare_unet_ms'] / batch:.3f} ms/row)"
              + (f"; classifier fwd+bwd over {bare['classifier_rows']} crops: {bare['classifier_fwd_bwd_ms']:.2f} ms"
                 if "classifier_fwd_bwd_ms" in bare else "")
              + (f"; Grad-CAM of {batch} images: {bare['grad_cam_ms']:.2f} ms" if "grad_cam_ms" in bare else "")
              + (f"; encode {bare['encode_ms']:.2f} ms, decode {bare['decode_ms']:.2f} ms"
                 if "encode_ms" in bare else ""))
        if r["model_breakdown_seconds"]:
            print("  model time by group (s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["model_breakdown_seconds"].items()))
        print(f"  pipeline {r['pipeline_seconds']:.3f} s, model replay {r['model_seconds']:.3f} s -> "
              f"{r['images_per_second']:.2f} images/s, overhead ratio {r['overhead_ratio']:.3f} "
              f"(median {r['ratio_median']:.3f}, fastest {r['ratio_fastest']:.3f}, formula {r['ratio_formula']:.3f}), "
              f"peak memory {r['peak_memory_mb']:.0f} MB",
              flush=True)
        if "model_gflop_per_image" in r:
            print(f"  floor: {r['model_gflop_per_image']:.3f} GFLOP / image in the model calls; the replay runs "
                  f"them at {r['model_gflops_per_second']:.1f} GFLOP/s = {100 * r['fraction_of_matmul_rate']:.0f}% of the "
                  f"matmul rate; floor {r['floor_images_per_second']:.2f} images/s, the pipeline reaches "
                  f"{100 * r['pipeline_fraction_of_floor']:.0f}% of it", flush=True)
        save()
        del pipe, quick_pipe

    if scaling:
        path = args.scaling_path
        print(f"\n[scaling] {path}: images/s by batch size", flush=True)
        for b in scaling:
            cfg, pipe, batch, quick_pipe = setup(path, b)
            count = max(b, args.scaling_images)
            key = (path, batch, count)
            if key not in measured:
                images, ids = suite.images(cfg, pipe, count)
                measured[key] = measure(pipe, images, ids, batch, repeats, device, breakdown=False,
                                        quick_pipe=quick_pipe, peak_rate=peak_rate(cfg))
            r = measured[key]
            keys = ("images", "images_per_second", "overhead_ratio", "ratio_median", "ratio_fastest",
                    "seconds_per_image", "model_seconds_per_image", "peak_memory_mb", "model_gflops_per_second",
                    "fraction_of_matmul_rate")
            report["scaling"][str(b)] = {k: r[k] for k in keys if k in r}
            print(f"  batch {b:4d}: {r['images']} images, {r['images_per_second']:.2f} images/s, "
                  f"model-only {1 / r['model_seconds_per_image']:.2f} images/s, "
                  f"overhead ratio {r['overhead_ratio']:.3f}"
                  + (f"; model calls at {r['model_gflops_per_second']:.1f} GFLOP/s "
                     f"({100 * r['fraction_of_matmul_rate']:.0f}% of the matmul rate)"
                     if "model_gflops_per_second" in r else ""),
                  flush=True)
            save()
            del pipe, quick_pipe
        first = report["scaling"][str(scaling[0])]
        for b in scaling[1:]:
            entry = report["scaling"][str(b)]
            entry["speedup_vs_first"] = entry["images_per_second"] / first["images_per_second"]
            entry["model_speedup_vs_first"] = first["model_seconds_per_image"] / entry["model_seconds_per_image"]
            print(f"  batch {b} / batch {scaling[0]}: {entry['speedup_vs_first']:.2f}x images/s "
                  f"(the model calls alone: {entry['model_speedup_vs_first']:.2f}x)")
        if "fraction_of_matmul_rate" in first:
            print("  the model calls run at "
                  + ", ".join(f"{100 * report['scaling'][str(b)]['fraction_of_matmul_rate']:.0f}% (batch {b})"
                              for b in scaling)
                  + " of the matmul rate: batching can lift them to about 100%, no further")
        save()
    for note in notes:
        print(f"note: {note}")
    save()
    return report

