"""Why deep inversion breaks: per set and per inversion depth, on validation splits only.

For each depth, one ``evaluate.py split=val diffguard.reference=unguided`` run (resumable, kept in
``outputs/diagnosis/<tag>/depth<d>/``) gives, per set:

- the round trip: PSNR (dB) of the unguided reconstruction against the input (``round_trip_psnr``);
- the guided-vs-unguided distance: the mean of ``diffguard/l2`` (what the label changed);
- the synthesis-against-input distance: the mean of ``diffguard/l2@input``;
- how often the synthesis changes class: 1 - (synthesis classified as its guiding label), and the same for the
  unguided reconstruction;
- near / far validation AUROC of DiffGuard with both references (l2).

Writes ``table.csv`` and ``depth_diagnosis.png`` (one panel per quantity, InD drawn apart) in the tag's folder.

    python -m benchmarks.experiments.depth_diagnosis --config conf/fashion_gdm.yaml \\
        --depths 10,15,20,25,30,35,40,45,48 limit_per_set=60 diffguard.guidance.scale=3
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from benchmarks.experiments.common import ROOT, evaluate, score_rows

QUANTITIES = (
    ("round_trip_psnr", "round trip: PSNR of the unguided reconstruction (dB)"),
    ("guided_vs_unguided_l2", "guided vs unguided synthesis: mean L2"),
    ("synthesis_vs_input_l2", "guided synthesis vs input: mean L2"),
    ("class_change", "synthesis classified as another class than its guiding label"),
    ("reference_class_change", "unguided reconstruction classified as another class"),
)


def run_depth(config: str, depth: int, extra: list, out: Path) -> dict:
    """One depth: evaluate.py on the validation splits with the unguided reference into ``out``; its results."""
    return evaluate(out, f"--config={config}", "split=val", f"diffguard.depth={depth}", "diffguard.reference=unguided",
                    "callbacks.reconstructions=0", "callbacks.score_plots=false", "callbacks.curves=false", *extra)


def per_set(out: Path, results: dict) -> list:
    """The quantities of the module docstring per set of one run (its folder and results)."""
    rows = [r for r in score_rows(out) if r["split"] == "val"]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    table = []
    for name in sets:
        mine = [r for r in rows if r["set"] == name]
        mean = lambda column: sum(float(r[column]) for r in mine) / len(mine)  # noqa: E731
        change = lambda column: sum(r[column] != r["pred"] for r in mine) / len(mine)  # noqa: E731
        table.append({"set": name, "group": results["groups"].get(name, "ind"), "samples": len(mine),
                      "round_trip_psnr": mean("round_trip_psnr"), "guided_vs_unguided_l2": mean("diffguard/l2"),
                      "synthesis_vs_input_l2": mean("diffguard/l2@input"),
                      "class_change": change("synthesis_pred"), "reference_class_change": change("reference_pred")})
    return table


def aurocs(results: dict) -> dict:
    """Near / far validation AUROC of diffguard/l2 against the unguided reference and against the input."""
    detectors = results["detectors"]
    return {f"{group}_auroc_{ref}": detectors[f"diffguard/l2{suffix}"][group]["auroc"]
            for group in ("near", "far") for ref, suffix in (("unguided", ""), ("input", "@input"))}


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, QUANTITIES):
        for name in sets:
            mine = sorted((r for r in rows if r["set"] == name), key=lambda r: r["depth"])
            ind = name == "ind"
            ax.plot([r["timestep"] for r in mine], [r[key] for r in mine], label=name,
                    color="black" if ind else None, linewidth=2.5 if ind else 1.2,
                    linestyle="--" if mine[0]["group"] == "near" else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("timestep reached by the inversion")
    ax = axes.flat[-1]
    depths = sorted({(r["timestep"], r["depth"]) for r in rows})
    first = {r["depth"]: r for r in rows}
    for key, style in (("near_auroc_unguided", "-"), ("far_auroc_unguided", "-"), ("near_auroc_input", "--"),
                       ("far_auroc_input", "--")):
        ax.plot([t for t, _ in depths], [100 * first[d][key] for _, d in depths], style, label=key)
    ax.axhline(50, color="grey", linewidth=0.8)
    ax.set_title("validation AUROC (%) of diffguard/l2: vs unguided (solid), vs input (dashed)", fontsize=9)
    ax.set_xlabel("timestep reached by the inversion")
    axes.flat[0].legend(fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--depths", required=True, help="comma-separated inversion depths")
    parser.add_argument("--tag", default=None, help="folder under outputs/diagnosis (default: the preset's name)")
    args, extra = parser.parse_known_args(argv)
    import torch

    from diffguard_pl.api import load_preset
    from diffguard_pl.method.ddim import Ladder
    from diffguard_pl.models.files import diffusion_folders

    folder = ROOT / "outputs" / "diagnosis" / (args.tag or Path(args.config).stem)
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        out = folder / f"depth{depth}"
        results = run_depth(args.config, depth, extra, out)
        run_cfg = load_preset(args.config, *extra, f"diffguard.depth={depth}")
        cfg, scheduler = run_cfg.diffguard, diffusion_folders(run_cfg.models.diffusion).scheduler
        length = json.loads((scheduler / "scheduler_config.json").read_text())["num_train_timesteps"]
        # the levels' timesteps depend only on the schedule's length, not on its values
        ladder = Ladder.build(torch.full((length,), 0.5, dtype=torch.float64), cfg.num_steps, cfg.ladder,
                              cfg.handoff, cfg.timestep_offset)
        timestep = int(ladder.timesteps[ladder.reached(depth)])
        for row in per_set(out, results):
            rows.append({"depth": depth, "timestep": timestep, **row, **aurocs(results)})
        print(f"depth {depth} (t = {timestep}) done", flush=True)
    with open(folder / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, folder / "depth_diagnosis.png")
    print(f"wrote {folder / 'table.csv'} and {folder / 'depth_diagnosis.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
