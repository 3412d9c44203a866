"""Fusions across the detector families, chosen on validation splits only (docs/results.md, "Fusion across families").

    python -m benchmarks.experiments.fusion_select --run outputs/val_fashion_gdm --grid outputs/diffusion_grid \
        --out outputs/fusion_select.json

Reads an evaluation run on validation splits (``split=val``: DiffGuard and the classifier detectors) and the
diffusion detectors' validation statistics saved by benchmarks/experiments/diffusion_grid.py at the points it
chose (the same samples: both take each set's validation images by id hash), so that no statistic is computed
twice. Every fusion of two or three detectors (z-scores summed, each normalised on the InD validation samples, as
evaluate.py fuses) is scored by the presets' rule: the mean of near- and far-OOD validation AUROC; within 1 point
of the best, the fewest UNet evaluations per image. Reported: the best fusion overall, the best that includes
DiffGuard, the best without it, and each family's best single detector. Test splits are never read.

    python -m benchmarks.experiments.fusion_select --compare outputs/fashion_gdm A B

prints the paired bootstrap difference of near / far AUROC of columns A - B of a finished test run (the same
test images; the run's fusion_partners must produce both columns): how the best fusion with DiffGuard compares with
the best without it.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from benchmarks.experiments.common import results_of, score_rows
from diffguard_pl.api import load_preset
from diffguard_pl.data import build_benchmark
from diffguard_pl.data.selection import subset_by_id
from diffguard_pl.detectors import registry
from diffguard_pl.detectors.diffusion import DiffusionDetector, classifier_features
from diffguard_pl.detectors.fused import zscore
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.models.loading import load_detector_diffusion, load_models
from diffguard_pl.records.columns import DIFFGUARD, fusion_column

META = ("id", "set", "split", "label", "pred")


def diffusion_scores(grid: dict, grid_dir: Path, preset: str, limit: int) -> dict:
    """{detector: {sample id: score}} of every diffusion detector at the grid's chosen point, on the grid's
    validation images (heads refitted as the grid fitted them)."""
    cfg = load_preset(preset, f"diffusion_detectors.names=[{','.join(grid['chosen'])}]")
    benchmark = build_benchmark(cfg.data)
    classifier, diffusion = load_models(cfg)
    diffusion = load_detector_diffusion(cfg, diffusion)
    sets = {"ind": subset_by_id(benchmark.val, limit)}
    sets.update({n: subset_by_id(s.val, limit) for n, s in benchmark.ood.items() if s.val is not None})
    from benchmarks.experiments.diffusion_grid import fit_head, head_view, rich

    out = {}
    for name, chosen in grid["chosen"].items():
        features = classifier_features(classifier)
        detector = DiffusionDetector(name, chosen["params"], diffusion, features, cfg.diffguard.seed)
        stats = torch.load(grid_dir / f"stats_{rich(detector, features)[1]}.pt", weights_only=True)
        fit_head(detector, stats)
        out[name] = {}
        for set_name, image_set in sets.items():
            values = detector.score(head_view(detector, stats[set_name])).tolist()
            out[name].update(dict(zip(image_set.ids, values)))
    return out


def compare(run: Path, a: str, b: str) -> dict:
    """Paired bootstrap differences (points) of near / far AUROC, column a - column b, on a run's test images."""
    from diffguard_pl.detectors.bootstrap import paired_difference

    groups = results_of(run)["groups"]
    rows = [r for r in score_rows(run) if r["split"] == "test"]
    sets = [s for s in groups if any(r["set"] == s for r in rows)]
    take = lambda column, s: torch.tensor([float(r[column]) for r in rows if r["set"] == s], dtype=torch.float64)
    out = {}
    for group in ("near", "far"):
        members = [s for s in sets if groups[s] == group]
        point, lo, hi = paired_difference(take(a, "ind"), {s: take(a, s) for s in members}, take(b, "ind"),
                                          {s: take(b, s) for s in members}, members)
        out[group] = {"point": 100 * point, "lo": 100 * lo, "hi": 100 * hi}
        print(f"{a} - {b}, {group}: {100 * point:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] points")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", nargs=3, metavar=("RUN", "A", "B"))
    parser.add_argument("--run", type=Path, help="an evaluate.py run with split=val")
    parser.add_argument("--grid", type=Path, help="benchmarks/experiments/diffusion_grid.py's --out")
    parser.add_argument("--preset", default="fashion_gdm")
    parser.add_argument("--max-size", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/fusion_select.json"))
    args = parser.parse_args(argv)
    if args.compare:
        return compare(Path(args.compare[0]), *args.compare[1:])
    if args.run is None or args.grid is None:
        parser.error("--run and --grid are needed (or --compare RUN A B)")
    grid = json.loads((args.grid / "grid.json").read_text())
    run = results_of(args.run)
    groups = run["groups"]
    rows = [r for r in score_rows(args.run) if r["split"] == "val"]
    diffusion = diffusion_scores(grid, args.grid, args.preset, grid["limit_per_set"])
    rows = [r for r in rows if all(r["id"] in d for d in diffusion.values())]  # the grid's (smaller) subsets
    singles = [DIFFGUARD] + [c for c in rows[0] if registry.is_classifier_detector(c)] + list(diffusion)
    scores = {d: torch.tensor([float(r[d]) if d in r else diffusion[d][r["id"]] for r in rows], dtype=torch.float64)
              for d in singles}
    sets = [r["set"] for r in rows]
    ind = torch.tensor([s == "ind" for s in sets])
    normalised = {d: (v - zscore(v[ind])[0]) / zscore(v[ind])[1] for d, v in scores.items()}
    dg_cost = float(run["throughput"]["unet_evals_per_image"])
    costs = {d: dg_cost if d == DIFFGUARD else grid["chosen"].get(d, {}).get("unet_evals_per_image", 0)
             for d in singles}

    def cost(parts) -> float:
        paths = {p for p in parts if p in (registry.DIFFPATH, registry.DIFFPATH_1D)}  # one shared path
        return sum(costs[p] for p in parts) - (costs[registry.DIFFPATH_1D] if len(paths) == 2 else 0)

    def evaluate(parts) -> dict:
        fused = sum(normalised[p] for p in parts)
        per_set = {s: auroc(fused[ind], fused[torch.tensor([x == s for x in sets])]) for s in groups
                   if s in sets}
        near = [v for s, v in per_set.items() if groups[s] == "near"]
        far = [v for s, v in per_set.items() if groups[s] == "far"]
        near, far = sum(near) / len(near), sum(far) / len(far)
        return {"detector": fusion_column(parts) if len(parts) > 1 else parts[0], "parts": list(parts),
                "near": near, "far": far, "objective": (near + far) / 2, "unet_evals_per_image": cost(parts),
                "mnist": per_set.get("mnist")}

    table = [evaluate((d,)) for d in singles]
    for size in range(2, args.max_size + 1):
        table += [evaluate(parts) for parts in itertools.combinations(singles, size)]
    result = {"run": str(args.run), "grid": str(args.grid), "samples": len(rows), "rule": grid["rule"],
              "best": pick(table), "best_with_diffguard": pick([r for r in table if DIFFGUARD in r["parts"]]),
              "best_without_diffguard": pick([r for r in table if DIFFGUARD not in r["parts"]]),
              "best_single": {family: pick([r for r in table if len(r["parts"]) == 1 and member(r["parts"][0])])
                              for family, member in (("diffguard", lambda d: d == DIFFGUARD),
                                                     ("classifier", registry.is_classifier_detector),
                                                     ("diffusion", registry.is_diffusion_detector))},
              "top": sorted(table, key=lambda r: -r["objective"])[:15]}
    args.out.write_text(json.dumps(result, indent=2))
    for key in ("best", "best_with_diffguard", "best_without_diffguard"):
        r = result[key]
        print(f"{key}: {r['detector']} near {100 * r['near']:.1f} far {100 * r['far']:.1f} "
              f"({r['unet_evals_per_image']:.0f} UNet evaluations per image)")
    for family, r in result["best_single"].items():
        print(f"best single {family}: {r['detector']} near {100 * r['near']:.1f} far {100 * r['far']:.1f}")
    return result


def pick(rows: list) -> dict:
    best = max(r["objective"] for r in rows)
    return min([r for r in rows if r["objective"] >= best - 0.01],
               key=lambda r: (r["unet_evals_per_image"], len(r["parts"]), -r["objective"]))


if __name__ == "__main__":
    main()
