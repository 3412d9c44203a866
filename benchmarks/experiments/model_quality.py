"""Quality figures of a preset's models: InD test accuracy, round-trip PSNR, and the training runs' validation loss.

- accuracy: the classifier on every InD test image;
- round-trip PSNR: DDIM-invert InD test images to the preset's depth (its ladder, steps and clipping), then run the
  synthesis back without guidance (the unguided reference), PSNR against the input in dB (higher = the model
  reconstructs better; the synthesis under the predicted label is what DiffGuard scores);
- validation loss: the best ``val/loss`` in each training run's logs/metrics.csv, when given with ``--runs``.

    python -m benchmarks.experiments.model_quality --preset fashion_gdm --images 256 \\
        --runs outputs/fashion_diffusion_uncond outputs/fashion_diffusion_cond
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

from diffguard_pl.api import DiffGuard, load_preset
from diffguard_pl.data import build_benchmark
from diffguard_pl.data.selection import subset_by_id
from diffguard_pl.method.scores import psnr


def best_val_loss(run: Path) -> dict:
    """The lowest ``val/loss`` logged by a training run, and its step."""
    with open(run / "logs" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/loss")]
    if not rows:
        raise SystemExit(f"error: {run}/logs/metrics.csv has no val/loss rows")
    best = min(rows, key=lambda r: float(r["val/loss"]))
    return {"val_loss": float(best["val/loss"]), "step": int(best["step"])}


def main(argv: list) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion_gdm")
    parser.add_argument("--images", type=int, default=256, help="InD test images for the round trip (id-hashed)")
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="training output folders")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_preset(args.preset, *overrides)
    bench = build_benchmark(cfg.data)
    detector = DiffGuard.from_preset(args.preset, "diffguard.reference=unguided", *overrides)
    pipe = detector.pipeline
    test = bench.test
    with torch.no_grad():
        pred = torch.cat([pipe.classifier(test.images[i:i + 512]).argmax(1) for i in range(0, len(test), 512)])
    accuracy = float((pred == test.labels).double().mean())
    chosen = subset_by_id(test, args.images, cfg.data.seed)
    images, ids = chosen.images, chosen.ids
    started = time.perf_counter()
    out = pipe(images, ids)
    seconds = time.perf_counter() - started
    round_trip = psnr(out["reference"], images)
    result = {
        "preset": args.preset, "ind_test_accuracy": accuracy, "ind_test_images": len(test),
        "round_trip_psnr_db": float(round_trip.mean()), "round_trip_psnr_median_db": float(round_trip.median()),
        "guided_psnr_db": float(psnr(out["synthesis"], images).mean()), "round_trip_images": len(ids),
        "depth": cfg.diffguard.depth, "num_steps": cfg.diffguard.num_steps, "seconds": seconds,
        "training_runs": {str(run): best_val_loss(run) for run in args.runs},
    }
    print(json.dumps(result, indent=2))
    if not math.isfinite(result["round_trip_psnr_db"]):
        raise SystemExit("error: the round trip gave NaN or Inf")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
