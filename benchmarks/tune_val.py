"""Choose a preset's DiffGuard settings on validation splits only; test splits are never read.

Runs evaluate.py with ``split=val`` (InD validation against every OOD set's validation split) over a grid and
applies a fixed rule:

1. ``diffguard.depth``, the guidance strength (``diffguard.guidance.scale``, or ``...classifier_free.omega`` in the
   classifier-free path) and ``diffguard.score`` (one of the computed distances): the highest near-OOD
   validation AUROC of DiffGuard alone (``diffguard/<distance>``), ties to the cheaper (shallower) setting;
2. the fusion partner X of ``diffguard+X``: the highest near-OOD validation AUROC of the fused detector at
   the chosen settings.

Every grid point is one evaluate.py run (all distances and fused detectors come from the same run), kept in
``outputs/tune/<preset>/``, so an interrupted tuning resumes. Prints every candidate and writes the choice
to ``outputs/tune/<preset>/choice.yaml`` (a fragment to include with ``--config``) and ``choice.json``.

    python benchmarks/tune_val.py --config conf/fashion_gdm.yaml \\
        --grid diffguard.depth=10,20,30 --grid diffguard.guidance.scale=1,3,10 limit_per_set=150
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_point(preset: list, overrides: list, extra: list, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "evaluate.py"), *preset, "split=val", f"output_dir={out}",
           "trainer.enable_progress_bar=false", "callbacks.reconstructions=0", "callbacks.score_plots=false",
           *overrides, *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def choose(points: list) -> dict:
    """The rule of the module docstring over ``points`` = [(overrides dict, results), ...]."""
    candidates = []
    for order, (settings, results) in enumerate(points):
        for name, entry in results["detectors"].items():
            if name.startswith("diffguard/"):
                candidates.append((entry["near"]["auroc"], -order, settings, name.split("/", 1)[1]))
    near, _, settings, score = max(candidates, key=lambda c: (c[0], c[1]))
    results = next(r for s, r in points if s == settings)
    fused = {name.split("+", 1)[1]: entry["near"]["auroc"] for name, entry in results["detectors"].items()
             if name.startswith("diffguard+")}
    partner = max(fused, key=lambda p: (fused[p], p == "ebo"))
    return {"settings": settings, "score": score, "near_val_auroc": near, "partner": partner,
            "fused_near_val_auroc": fused[partner], "fused_candidates": fused}


def main(argv: list) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the preset to tune")
    parser.add_argument("--grid", action="append", required=True, help="key=v1,v2,... (repeatable)")
    args, extra = parser.parse_known_args(argv)
    import yaml

    grid = {k: [yaml.safe_load(x) for x in v.split(",")] for k, v in (item.split("=", 1) for item in args.grid)}
    tag = Path(args.config).stem
    folder = ROOT / "outputs" / "tune" / tag
    points = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values))
        out = folder / "_".join(f"{k.split('.')[-1]}{v}" for k, v in settings.items())
        results = run_point([f"--config={args.config}"], [f"{k}={v}" for k, v in settings.items()], extra, out)
        points.append((settings, results))
        best = max((e["near"]["auroc"], n) for n, e in results["detectors"].items() if n.startswith("diffguard"))
        print(f"{' '.join(f'{k}={v}' for k, v in settings.items()):60s} best near val AUROC {100 * best[0]:.2f} "
              f"({best[1]})", flush=True)
    print(f"\n{'settings':60s} {'detector':28s} near AUROC  far AUROC")
    for settings, results in points:
        for name, entry in results["detectors"].items():
            if name.startswith("diffguard"):
                print(f"{' '.join(f'{k}={v}' for k, v in settings.items()):60s} {name:28s} "
                      f"{100 * entry['near']['auroc']:10.2f} {100 * entry['far']['auroc']:10.2f}")
    choice = choose(points)
    choice["grid"] = grid
    choice["extra"] = extra
    (folder / "choice.json").write_text(json.dumps(choice, indent=2))
    lines = ["# Chosen on validation splits by benchmarks/tune_val.py (see choice.json)."]
    tree: dict = {}
    for key, value in {**choice["settings"], "diffguard.score": choice["score"]}.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    from omegaconf import OmegaConf

    lines.append(OmegaConf.to_yaml(OmegaConf.create(tree)).rstrip())
    (folder / "choice.yaml").write_text("\n".join(lines) + "\n")
    print(f"\nchosen: {choice['settings']} score={choice['score']} (near val AUROC {100 * choice['near_val_auroc']:.2f}); "
          f"fusion partner {choice['partner']} (diffguard+{choice['partner']} near val AUROC "
          f"{100 * choice['fused_near_val_auroc']:.2f}); written to {folder / 'choice.yaml'}")
    return choice


if __name__ == "__main__":
    main(sys.argv[1:])
