"""Choose a preset's DiffGuard settings on validation splits only; test splits are never read.

Runs evaluate.py with ``split=val`` (InD validation against every OOD set's validation split) over a grid and
applies a rule fixed before looking at any result:

1. Candidates: every grid point x every computed distance x both references. A run with
   ``diffguard.reference=unguided`` scores the guided synthesis against the unguided reconstruction
   (``diffguard/<d>``) and against the input (``diffguard/<d>@input``, what ``reference=input`` scores), so one
   run gives both.
2. Objective: the mean of the near-OOD and the far-OOD validation AUROC of DiffGuard alone (the paper reports
   both; far = the mean over the far sets).
3. Among the candidates within ``--tolerance`` points (default 1.0) of the best objective, the cheapest in
   denoiser evaluations per image (``reference=input`` saves the unguided pass), then the best objective.
4. The fusion partner X of ``diffguard+X`` (every classifier detector the run recorded): the best objective of the fused
   detector, recomputed from the chosen run's scores with the chosen distance.

Every grid point is one evaluate.py run kept in ``outputs/tune/<tag>/<point>/``; ``limit_per_set`` is not part
of a run's fingerprint, so a second call with a larger limit (coarse to fine) only evaluates the new samples.
Prints every candidate (near, far, objective, MNIST, cost, speed) and writes the choice to
``outputs/tune/<tag>/choice.yaml`` (a fragment to include with ``--config``), ``choice.json`` and
``candidates.csv``.

    python -m benchmarks.experiments.tune_val --config conf/fashion_gdm.yaml --grid diffguard.depth=10,20,30,40 \\
        --grid diffguard.guidance.scale=1,3,10 diffguard.reference=unguided limit_per_set=150
    python -m benchmarks.experiments.tune_val ... --only depth30_scale3   # one point of the grid (coarse to fine)
    python -m benchmarks.experiments.tune_val ... --point diffguard.depth=30,diffguard.ladder=released   # a variant
    python -m benchmarks.experiments.tune_val --config my_data.yaml --config my_eval.yaml ...   # your own data
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

from benchmarks.experiments.common import ROOT, evaluate, results_of, score_rows


def baselines_of(records: dict) -> list:
    """The classifier detectors (the registry's) whose scores a run recorded."""
    from diffguard_pl.detectors.registry import names

    return [name for name in names() if name in records]


def run_point(preset: list, overrides: list, extra: list, out: Path) -> dict:
    """One grid point: evaluate.py on the validation splits into ``out`` (resuming what it holds); its results."""
    return evaluate(out, *preset, "split=val", "callbacks.reconstructions=0", "callbacks.score_plots=false",
                    *extra, *overrides)


def read_scores(run_dir: Path) -> dict:
    """A run's scores.csv as record columns (numbers where they parse)."""
    rows = score_rows(run_dir)

    def value(text: str):
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    return {c: [value(r[c]) for r in rows] for c in rows[0]}


def objective(entry: dict) -> float:
    return (entry["near"]["auroc"] + entry["far"]["auroc"]) / 2


def synthesis_steps(cfg: dict) -> int:
    d = cfg["diffguard"]
    return d["depth"] + (d["ladder"] == "released") + (d["handoff"] == "released")


def candidates_of(settings: dict, results: dict, cfg: dict) -> list:
    """Every DiffGuard distance of one run as a candidate: settings, distance, reference, metrics, cost."""
    evals = results["throughput"]["unet_evals_per_image"]
    unguided = cfg["diffguard"]["reference"] == "unguided"
    out = []
    for name, entry in results["detectors"].items():
        if not name.startswith("diffguard/"):
            continue
        distance = name.split("/", 1)[1]
        against_input = distance.endswith("@input")
        reference = "input" if against_input or not unguided else "unguided"
        # reference=input runs no unguided pass: one denoiser row per synthesis step fewer
        cost = evals - synthesis_steps(cfg) if unguided and reference == "input" else evals
        out.append({"settings": settings, "distance": distance.removesuffix("@input"), "column": distance,
                    "reference": reference, "near": entry["near"]["auroc"], "far": entry["far"]["auroc"],
                    "objective": objective(entry), "mnist": entry["per_ood"].get("mnist", {}).get("auroc"),
                    "unet_evals": cost, "images_per_second": results["throughput"]["images_per_second"]})
    return out


def choose(candidates: list, tolerance: float) -> dict:
    """Rule 3 of the module docstring."""
    best = max(c["objective"] for c in candidates)
    close = [c for c in candidates if c["objective"] >= best - tolerance / 100]
    return min(close, key=lambda c: (c["unet_evals"], -c["objective"]))


def fused_partners(run_dir: Path, column: str, groups: dict) -> dict:
    """Objective, near and far AUROC of diffguard+X for every baseline X, with ``column`` as DiffGuard's score."""
    from diffguard_pl.detectors.fused import with_derived_detectors
    from diffguard_pl.detectors.results import summarize

    records = read_scores(run_dir)
    records = {c: v for c, v in records.items() if not c.startswith("diffguard+") and c != "diffguard"}
    baselines = baselines_of(records)
    records, _ = with_derived_detectors(records, column.split("/", 1)[1], baselines)
    keep = ["id", "set", "split", "label", "pred"] + [f"diffguard+{b}" for b in baselines] + baselines
    result = summarize({c: records[c] for c in keep}, groups, "val", replicates=0)
    return {name: {"near": e["near"]["auroc"], "far": e["far"]["auroc"], "objective": objective(e)}
            for name, e in result["detectors"].items()}


def point_name(settings: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}{v}" for k, v in settings.items())


def main(argv: list) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append",
                        help="the preset to tune (repeatable, as for evaluate.py: e.g. your data, then your preset)")
    parser.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable): their product")
    parser.add_argument("--point", action="append", default=[],
                        help="key=v,key=v (repeatable): one more point beside the grid's, e.g. a variant of the best")
    parser.add_argument("--tag", default=None, help="folder under outputs/tune (default: the preset's name)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points of the objective that count as a tie")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the points whose folder name contains this (the others are read if done)")
    args, extra = parser.parse_known_args(argv)
    import yaml

    grid = {k: [yaml.safe_load(x) for x in v.split(",")] for k, v in (item.split("=", 1) for item in args.grid)}
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    points += [{k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in point.split(","))}
               for point in args.point]
    if not points:
        parser.error("give --grid and / or --point")
    folder = ROOT / "outputs" / "tune" / (args.tag or Path(args.config[-1]).stem)
    candidates, groups, runs = [], None, {}
    for settings in points:
        out = folder / point_name(settings)
        if args.only and not any(o in point_name(settings) for o in args.only):
            if not (out / "results.json").is_file():
                continue
            results = results_of(out)
        else:
            overrides = [f"{k}={v}" for k, v in settings.items()]
            results = run_point([f"--config={c}" for c in args.config], overrides, extra, out)
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        groups = results["groups"]
        runs[point_name(settings)] = out
        found = candidates_of(settings, results, cfg)
        candidates += found
        top = max(found, key=lambda c: c["objective"])
        print(f"{point_name(settings):40s} best {top['column']:28s} near {100 * top['near']:5.1f} far "
              f"{100 * top['far']:5.1f} ({results['num_samples']} samples)", flush=True)
    print(f"\n{'point':40s} {'distance':14s} {'reference':9s} {'near':>6s} {'far':>6s} {'mean':>6s} {'mnist':>6s} "
          f"{'evals':>6s} {'img/s':>6s}")
    for c in sorted(candidates, key=lambda c: -c["objective"]):
        print(f"{point_name(c['settings']):40s} {c['distance']:14s} {c['reference']:9s} {100 * c['near']:6.1f} "
              f"{100 * c['far']:6.1f} {100 * c['objective']:6.1f} {100 * (c['mnist'] or float('nan')):6.1f} "
              f"{c['unet_evals']:6.0f} {c['images_per_second'] or float('nan'):6.2f}")
    chosen = choose(candidates, args.tolerance)
    partners = fused_partners(runs[point_name(chosen["settings"])], f"diffguard/{chosen['column']}", groups)
    names = [name for name in partners if not name.startswith("diffguard")]
    baseline = {b: partners[b] for b in names}
    fused = {b: partners[f"diffguard+{b}"] for b in names}
    partner = max(fused, key=lambda b: fused[b]["objective"])
    print(f"\nat the chosen settings, objective (near / far) of diffguard+X and X alone:")
    for b in names:
        print(f"  {b:9s} fused {100 * fused[b]['objective']:5.1f} ({100 * fused[b]['near']:5.1f} / "
              f"{100 * fused[b]['far']:5.1f})   alone {100 * baseline[b]['objective']:5.1f} "
              f"({100 * baseline[b]['near']:5.1f} / {100 * baseline[b]['far']:5.1f})")
    choice = {"settings": chosen["settings"], "score": chosen["distance"], "reference": chosen["reference"],
              "objective": chosen["objective"], "near": chosen["near"], "far": chosen["far"],
              "unet_evals": chosen["unet_evals"], "partner": partner, "fused": fused, "baselines": baseline,
              "rule": f"mean of near and far validation AUROC; ties within {args.tolerance} points to the cheapest",
              "grid": grid, "points": args.point, "extra": extra}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "choice.json").write_text(json.dumps(choice, indent=2))
    with open(folder / "candidates.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["point", "distance", "reference", "near", "far", "objective", "mnist", "unet_evals",
                         "images_per_second"])
        for c in candidates:
            writer.writerow([point_name(c["settings"]), c["distance"], c["reference"], c["near"], c["far"],
                             c["objective"], c["mnist"], c["unet_evals"], c["images_per_second"]])
    tree: dict = {}
    for key, value in {**chosen["settings"], "diffguard.score": chosen["distance"],
                       "diffguard.reference": chosen["reference"], "fusion_partners": [partner]}.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    from omegaconf import OmegaConf

    header = "# Chosen on validation splits by benchmarks/experiments/tune_val.py (see choice.json).\n"
    (folder / "choice.yaml").write_text(header + OmegaConf.to_yaml(OmegaConf.create(tree)))
    print(f"\nchosen: {chosen['settings']} score={chosen['distance']} reference={chosen['reference']} "
          f"(near {100 * chosen['near']:.1f}, far {100 * chosen['far']:.1f}, {chosen['unet_evals']:.0f} UNet "
          f"evaluations per image); fusion partner {partner}; written to {folder / 'choice.yaml'}")
    return choice


if __name__ == "__main__":
    main(sys.argv[1:])
