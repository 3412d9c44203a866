"""The diffusion detectors' hyperparameters, chosen on validation splits only (docs/results.md, "Diffusion detectors").

    python -m benchmarks.experiments.diffusion_grid --preset fashion_gdm --limit 150 --out outputs/diffusion_grid

For every diffusion detector and every point of its registry grid (diffguard_pl/detectors/registry.py), the
statistics of ``--limit`` validation images per set (InD and every OOD set, chosen by id hash) and, for the
detectors fitted on InD training images, of ``--train`` InD training images (chosen by id hash, the evaluation's
rule); the head fitted as evaluate.py fits it (DDPM-OOD: z-scores on the InD validation images scored); per set
AUROC; near / far: the mean over the group's sets. Rule, the presets' (fixed before looking): the mean of near and
far validation AUROC; within 1 point of the best, the fewest UNet evaluations per image (then the higher mean).
Points that differ only in the head (DDPM-OOD's features, LMD's distance, DiffPath-6D against -1D) share their
statistics. Test splits are never read. Statistics are saved per point in ``--out`` (a second start reuses them);
the table and the choice go to ``--out/grid.json`` and the console.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from diffguard_pl.api import load_preset
from diffguard_pl.console import Phase
from diffguard_pl.data import build_benchmark
from diffguard_pl.data.selection import subset_by_id
from diffguard_pl.detectors import registry
from diffguard_pl.detectors.diffusion import DiffusionDetector, classifier_features
from diffguard_pl.detectors.diffusion_fitting import batch_statistics
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.models.loading import load_detector_diffusion, load_models

# Head-only choices: computed once with the richer statistics (features on), then read both ways.
RICH = {registry.DDPM_OOD: {"features": "classifier"}, registry.LMD: {"distance": "features"}}


def points(name: str) -> list:
    """Every point of a detector's grid, as complete params."""
    grid = registry.diffusion_detector(name).grid
    return [registry.diffusion_params(name, dict(zip(grid, values))) for values in itertools.product(*grid.values())]


def rich(detector: DiffusionDetector, features) -> tuple:
    """(the detector whose statistics serve ``detector``: the classifier's ``features`` on where they are a
    head-only choice, the name its statistics are saved under in ``--out``)."""
    p = detector.params
    if detector.name in (registry.DIFFPATH, registry.DIFFPATH_1D):  # both read the same path
        return detector, f"path_{p['num_steps']}"
    richer = DiffusionDetector(detector.name, {**p, **RICH.get(detector.name, {})}, detector.diffusion,
                               features, detector.seed)
    return richer, "_".join(str(v) for v in (richer.name, *sorted(richer.params.items())))


def head_view(detector: DiffusionDetector, stats: dict) -> dict:
    """The part of the richer statistics ``detector``'s head reads (DDPM-OOD without features: the MSE only)."""
    if detector.name == registry.DDPM_OOD and detector.params["features"] == "none":
        return {k: v for k, v in stats.items() if k == "mse"}
    return stats


def fit_head(detector: DiffusionDetector, stats: dict) -> DiffusionDetector:
    """Fit on the images the registry names: ``stats["train"]`` (InD training) or ``stats["ind"]`` (InD
    validation: DDPM-OOD); LMD: nothing."""
    if detector.fit_on == registry.FIT_TRAIN:
        detector.fit(head_view(detector, stats["train"]))
    elif detector.fit_on == registry.FIT_VAL:
        detector.fit(head_view(detector, stats["ind"]))
    return detector


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fashion_gdm")
    parser.add_argument("--limit", type=int, default=150, help="validation images per set (id hash)")
    parser.add_argument("--train", type=int, default=2000, help="InD training images the mixtures are fitted on")
    parser.add_argument("--detectors", nargs="*", default=[d.name for d in registry.DIFFUSION_DETECTORS])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("outputs/diffusion_grid"))
    args = parser.parse_args(argv)
    cfg = load_preset(args.preset, f"diffusion_detectors.names=[{','.join(args.detectors)}]")
    benchmark = build_benchmark(cfg.data)
    classifier, diffusion = load_models(cfg)
    diffusion = load_detector_diffusion(cfg, diffusion)
    features = classifier_features(classifier)
    sets = {"ind": subset_by_id(benchmark.val, args.limit)}
    sets.update({name: subset_by_id(s.val, args.limit) for name, s in benchmark.ood.items() if s.val is not None})
    groups = {name: s.group for name, s in benchmark.ood.items() if name in sets}
    train = subset_by_id(benchmark.train, args.train, cfg.data.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.detectors:
        for params in points(name):
            detector = DiffusionDetector(name, params, diffusion, features, cfg.diffguard.seed)
            stats = _statistics(*rich(detector, features), sets, train, args)
            rows.append(_evaluate(detector, stats, groups))
            print(json.dumps(rows[-1]), flush=True)
    choice = choose(rows)
    result = {"preset": args.preset, "limit_per_set": args.limit, "train_samples": args.train,
              "rule": "mean of near and far validation AUROC; within 1 point of the best, the fewest UNet "
                      "evaluations per image", "rows": rows, "chosen": choice}
    (args.out / "grid.json").write_text(json.dumps(result, indent=2))
    print(table(rows, choice))
    return result


def _statistics(detector: DiffusionDetector, key: str, sets: dict, train, args) -> dict:
    """Per set (and ``train`` where the head needs it) the detector's statistics; saved in ``--out``."""
    path = args.out / f"stats_{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    wanted = dict(sets)
    if detector.fit_on == registry.FIT_TRAIN:
        wanted["train"] = train
    total = sum(len(s) for s in wanted.values())
    out = {}
    with Phase(f"{key}: statistics of {total:,} images ({detector.unet_evals_per_image()} UNet evaluations each)",
               total) as phase:
        for name, image_set in wanted.items():
            out[name] = batch_statistics([detector], image_set, args.batch_size, "cpu", phase)[detector.name]
    torch.save(out, path)
    return out


def _evaluate(detector: DiffusionDetector, stats: dict, groups: dict) -> dict:
    name, params = detector.name, detector.params
    started = time.perf_counter()
    fit_head(detector, stats)
    scores = {s: detector.score(head_view(detector, stats[s])) for s in ["ind", *groups]}
    per_set = {s: auroc(scores["ind"], scores[s]) for s in groups}
    mean = lambda group: sum(v for s, v in per_set.items() if groups[s] == group) / max(
        1, sum(groups[s] == group for s in per_set))
    return {"detector": name, "params": params, "unet_evals_per_image": detector.unet_evals_per_image(),
            "near": mean("near"), "far": mean("far"), "objective": (mean("near") + mean("far")) / 2,
            "per_set": per_set, "fit": detector.describe_fit(), "fit_seconds": time.perf_counter() - started}


def choose(rows: list) -> dict:
    """Per detector, the rule's point (see the module docstring)."""
    out = {}
    for name in dict.fromkeys(r["detector"] for r in rows):
        mine = [r for r in rows if r["detector"] == name]
        best = max(r["objective"] for r in mine)
        close = [r for r in mine if r["objective"] >= best - 0.01]
        pick = min(close, key=lambda r: (r["unet_evals_per_image"], -r["objective"]))
        out[name] = {"params": pick["params"], "unet_evals_per_image": pick["unet_evals_per_image"],
                     "objective": pick["objective"], "best_objective": best}
    return out


def table(rows: list, choice: dict) -> str:
    lines = ["| detector | params | UNet evals / image | near AUROC | far AUROC | mean | chosen |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        chosen = "**yes**" if choice[r["detector"]]["params"] == r["params"] else ""
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['detector']} | {params} | {r['unet_evals_per_image']} | {100 * r['near']:.1f} | "
                     f"{100 * r['far']:.1f} | {100 * r['objective']:.1f} | {chosen} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
