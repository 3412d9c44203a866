"""Does adaptive early stop save wall time in proportion to the UNet evaluations it saves?

Runs the DiffGuard pipeline twice on the same images and batch size: at fixed
depth, and with AES stopping samples at varied depths. Prints, measured in
this one run, images/s and UNet evaluations per image of both, and

    efficiency = (UNet evaluations per second with AES) / (UNet evaluations per second at fixed depth)

which is 1.0 when AES wastes nothing (target: at least 0.85).

    python -m benchmarks.experiments.aes_efficiency [--config conf/digits_gdm.yaml] [key=value ...] \\
        diffguard.aes.psnr=THRESHOLD
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig
from diffguard_pl.data import build_benchmark
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.method.pipeline import DiffGuardPipeline


def timed(pipe: DiffGuardPipeline, images: torch.Tensor, ids: list, batch_size: int, repeats: int) -> dict:
    best, evals, depth = float("inf"), 0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        evals, depths = 0, []
        for i in range(0, len(images), batch_size):
            out = pipe(images[i : i + batch_size], ids[i : i + batch_size])
            evals += int(out["unet_evals"].sum())
            depths.append(out["depth"].float())
        best = min(best, time.perf_counter() - start)
        depth = float(torch.cat(depths).mean())
    return {"seconds": best, "images_per_second": len(images) / best, "unet_evals_per_image": evals / len(images),
            "unet_evals_per_second": evals / best, "mean_depth": depth}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="preset name or YAML file, repeatable, merged in order (default: digits_gdm)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. diffguard.aes.psnr=12")
    args = parser.parse_intermixed_args(argv)
    repeats = 2
    cfg = config_lib.to_object(config_lib.compose(EvalConfig, args.config or ["digits_gdm"], args.overrides))
    if not cfg.diffguard.aes.enabled:
        raise SystemExit("pass AES thresholds, e.g. diffguard.aes.enabled=true diffguard.aes.psnr=12")
    benchmark = build_benchmark(cfg.data)
    per_set = cfg.limit_per_set or 64
    sets = [benchmark.test] + [s.test for s in benchmark.ood.values()]
    images = torch.cat([s.images[:per_set] for s in sets])
    ids = [i for s in sets for i in s.ids[:per_set]]
    classifier, diffusion = load_classifier(cfg.models.classifier), load_diffusion(cfg.models.diffusion)
    fixed_cfg = copy.deepcopy(cfg.diffguard)
    fixed_cfg.aes.enabled = False
    runs = {}
    for name, dg in (("fixed depth", fixed_cfg), ("AES", cfg.diffguard)):
        pipe = DiffGuardPipeline(diffusion, classifier, dg)
        pipe(images[:8], ids[:8])  # warm-up
        runs[name] = timed(pipe, images, ids, cfg.data.eval_batch_size, repeats)
    print(f"{len(images)} images, batch size {cfg.data.eval_batch_size}, {torch.get_num_threads()} threads, "
          f"device {next(classifier.parameters()).device}")
    print(f"{'run':12s} {'images/s':>9s} {'UNet evals/img':>15s} {'mean depth':>11s} {'UNet evals/s':>13s}")
    for name, r in runs.items():
        print(f"{name:12s} {r['images_per_second']:9.2f} {r['unet_evals_per_image']:15.1f} {r['mean_depth']:11.2f} "
              f"{r['unet_evals_per_second']:13.1f}")
    ratio = runs["AES"]["unet_evals_per_second"] / runs["fixed depth"]["unet_evals_per_second"]
    print(f"efficiency (UNet evals/s with AES over fixed depth): {ratio:.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main(sys.argv[1:])
