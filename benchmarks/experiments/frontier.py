"""One cost axis: validation AUROC against UNet evaluations per image, DiffGuard and the diffusion detectors
(docs/results.md, "One cost axis").

    python -m benchmarks.experiments.frontier --grid outputs/diffusion_grid --limit 100 --out outputs/frontier

DiffGuard on both Fashion presets at 5, 10, 20 and 50 DDIM steps (the inversion depth scaled with the steps, so
that it reaches the preset's timestep; the classifier-free preset also with DSG off), each an evaluate.py run on
the validation splits (``--limit`` images per set, chosen by id hash: the grid's images); the diffusion detectors'
points from benchmarks/experiments/diffusion_grid.py's table. Per point: near / far / MNIST AUROC, UNet
evaluations per image and, for DiffGuard, images/s in the test loop; the Pareto frontier of the mean of near and
far AUROC against cost. Writes ``--out/frontier.json``, ``--out/frontier.md`` and ``--out/frontier.png``.
Test splits are never read. Each run is a folder under ``--out`` (a second start reuses finished runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.experiments.common import ROOT, evaluate
from diffguard_pl.api import load_preset

PRESETS = {"fashion_gdm": [[]], "fashion_classifier_free": [[], ["diffguard.guidance.classifier_free.dsg=false"]]}
STEPS = (5, 10, 20, 50)


def diffguard_points(limit: int, out: Path, steps=STEPS, presets=tuple(PRESETS), collect: bool = False) -> list:
    """DiffGuard's points (``collect``: only the runs already finished in ``out``, none started)."""
    rows = []
    for preset, variants in [(p, PRESETS[p]) for p in presets]:
        cfg = load_preset(preset)
        for extra in variants:
            for n in steps:
                depth = max(1, round(cfg.diffguard.depth * n / cfg.diffguard.num_steps))
                name = f"{preset}_{n}" + ("_dsg_off" if extra else "")
                settings = [f"diffguard.num_steps={n}", f"diffguard.depth={depth}", *extra]
                if collect and not (out / name / "results.json").is_file():
                    continue
                results = evaluate(out / name, "--config", str(ROOT / "conf" / f"{preset}.yaml"), "split=val",
                                   f"limit_per_set={limit}", "callbacks.reconstructions=0",
                                   "callbacks.score_plots=false", "callbacks.curves=false", *settings, reuse=True)
                entry = results["detectors"]["diffguard"]
                rows.append({"detector": "diffguard", "preset": preset, "settings": settings,
                             "unet_evals_per_image": results["throughput"]["unet_evals_per_image"],
                             "images_per_second": results["throughput"]["images_per_second"],
                             "near": entry["near"]["auroc"], "far": entry["far"]["auroc"],
                             "mnist": entry["per_ood"].get("mnist", {}).get("auroc")})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def grid_points(grid_dir: Path) -> list:
    grid = json.loads((grid_dir / "grid.json").read_text())
    return [{"detector": r["detector"], "preset": grid["preset"],
             "settings": [f"{k}={v}" for k, v in r["params"].items()],
             "unet_evals_per_image": r["unet_evals_per_image"], "images_per_second": None, "near": r["near"],
             "far": r["far"], "mnist": r["per_set"].get("mnist")} for r in grid["rows"]]


def pareto(rows: list) -> list:
    """The points no cheaper point beats on the mean of near and far AUROC."""
    best, out = -1.0, []
    for r in sorted(rows, key=lambda r: (r["unet_evals_per_image"], -(r["near"] + r["far"]))):
        if (r["near"] + r["far"]) / 2 > best:
            best = (r["near"] + r["far"]) / 2
            out.append(r)
    return out


def markdown(rows: list, front: list) -> str:
    lines = ["| detector | preset / settings | UNet evals / image | images/s | near | far | MNIST | mean | frontier |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["detector"], r["unet_evals_per_image"])):
        speed = f"{r['images_per_second']:.1f}" if r["images_per_second"] else "-"
        mnist = f"{100 * r['mnist']:.1f}" if r["mnist"] is not None else "-"
        lines.append(f"| {r['detector']} | {r['preset']}: {', '.join(r['settings'])} | "
                     f"{r['unet_evals_per_image']:.0f} | {speed} | {100 * r['near']:.1f} | {100 * r['far']:.1f} | "
                     f"{mnist} | {50 * (r['near'] + r['far']):.1f} | {'yes' if r in front else ''} |")
    return "\n".join(lines)


def series(row: dict) -> str:
    """A line of the plot: the detector, with what changes its kind (DiffGuard's preset and DSG, the head's input)."""
    name = row["detector"] + (f" ({row['preset']})" if row["detector"] == "diffguard" else "")
    name += " DSG off" if any(s.endswith("dsg=false") for s in row["settings"]) else ""
    extra = [s.split("=")[1] for s in row["settings"] if s.split("=")[0] in ("features", "distance")]
    return name + (f" [{extra[0]}]" if extra and extra[0] not in ("none", "mse") else "")


def plot(rows: list, front: list, path: Path) -> None:
    """Per series its best point at each cost (the mean of near and far decides), near and far AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    names = list(dict.fromkeys(series(r) for r in rows))
    for name in names:
        best = {}
        for r in rows:
            if series(r) == name:
                cost = r["unet_evals_per_image"]
                if cost not in best or r["near"] + r["far"] > best[cost]["near"] + best[cost]["far"]:
                    best[cost] = r
        points = [best[c] for c in sorted(best)]
        for ax, key in zip(axes, ("near", "far")):
            ax.plot([r["unet_evals_per_image"] for r in points], [100 * r[key] for r in points], "o-", label=name,
                    alpha=0.85)
    for ax, key in zip(axes, ("near", "far")):
        ax.set_xscale("log")
        ax.set_xlabel("UNet evaluations per image (log)")
        ax.set_ylabel(f"{key}-OOD AUROC, validation (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Fashion-OOD validation (100 images per set): AUROC against cost, best point per cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, default=Path("outputs/diffusion_grid"))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="*", default=list(STEPS))
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--collect", action="store_true", help="only read the DiffGuard runs finished in --out")
    parser.add_argument("--out", type=Path, default=Path("outputs/frontier"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = diffguard_points(args.limit, args.out, args.steps, args.presets, args.collect)
    rows = grid_points(args.grid) + rows
    front = pareto(rows)
    (args.out / "frontier.json").write_text(json.dumps({"rows": rows, "frontier": front}, indent=2))
    (args.out / "frontier.md").write_text(markdown(rows, front) + "\n")
    plot(rows, front, args.out / "frontier.png")
    print(markdown(rows, front))
    return {"rows": rows, "frontier": front}


if __name__ == "__main__":
    main()
