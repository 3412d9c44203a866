"""The paper's claims, measured on the embedded Fashion-OOD benchmark (test splits; nothing chosen on test).

Runs (each one evaluate.py command, kept in ``--out``; a finished run is not repeated, so this resumes):

- ``gdm``: the main preset (conf/fashion_gdm.yaml: classifier guidance, settings chosen on validation splits)
  with both oracles: every detector, the fused detectors, ``oracle=paper`` and ``oracle=ind``;
- ``classifier_free``: the classifier-free path with DSG (conf/fashion_classifier_free.yaml), and without DSG;
- ``aes``: the main preset with adaptive early stop, its PSNR threshold calibrated on InD validation
  (``python -m diffguard_pl.jobs.calibration``);
- ``finetune`` / ``cotrain`` / ``joint``: the main preset with classifiers fine-tuned on real images, co-trained
  on the diffusion model's clean estimates, or trained jointly with it (conf/train_fashion_{finetune,cotrain,joint}.yaml;
  a run whose models are missing is left out and named).

Then prints, and writes to ``OUT/claims.md`` and ``OUT/claims.json``: near / far AUROC (95% bootstrap interval)
and FPR@95 of every detector; fused DiffGuard + X against X alone and each oracle against DiffGuard, as paired
bootstrap intervals of the AUROC difference on the same samples; the other runs against the main one (paired
on the samples both scored); and, per set, how often the guided synthesis is classified as the label that
guided it, with DiffGuard's mean score.

    python -m benchmarks.experiments.fashion_claims            # the demo subset (the presets' limit_per_set)
    python -m benchmarks.experiments.fashion_claims --full --out outputs/claims_full    # every test image (hours)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.experiments.common import ROOT, evaluate, score_rows
from diffguard_pl.detectors.bootstrap import paired_difference
from diffguard_pl.detectors.results import paired

GROUPS = ("near", "far")


def run(out: Path, *argv: str) -> dict:
    """One evaluate.py run into ``out``, its output shown (skipped when its results exist); its results.json."""
    return evaluate(out, *argv, reuse=True, quiet=False)


def read_scores(out: Path) -> dict:
    """A run's scores.csv rows by sample id."""
    return {row["id"]: row for row in score_rows(out)}


def paired_runs(a: dict, b: dict, column_a: str, column_b: str, groups: dict) -> dict:
    """Near / far AUROC of run a's ``column_a`` minus run b's ``column_b`` over the test samples both scored:
    ``{"near": {"point", "lo", "hi"}, "far": ...}``, like results.json's ``comparisons``."""
    shared = [i for i in a if i in b and a[i]["split"] == "test"]

    def scores(rows, column, set_name):
        return torch.tensor([float(rows[i][column]) for i in shared if rows[i]["set"] == set_name],
                            dtype=torch.float64)

    sets = sorted({a[i]["set"] for i in shared} - {"ind"})
    oods_a = {s: scores(a, column_a, s) for s in sets}
    oods_b = {s: scores(b, column_b, s) for s in sets}
    compared = {group: [s for s in sets if groups.get(s) == group] for group in GROUPS}
    compared["mnist"] = [s for s in sets if s == "mnist"]  # on its own too: the paper's MSP failure case
    ind_a, ind_b = scores(a, column_a, "ind"), scores(b, column_b, "ind")
    return {group: paired(paired_difference(ind_a, oods_a, ind_b, oods_b, members))
            for group, members in compared.items() if members}


def diagnosis(rows: dict, groups: dict) -> list:
    """Per set: how often the synthesis is classified as the label that guided it (the prediction), and the
    mean DiffGuard score."""
    out = []
    for set_name in ["ind", *groups]:
        mine = [r for r in rows.values() if r["set"] == set_name and r["split"] == "test"]
        if not mine:
            continue
        agree = [r for r in mine if "synthesis_pred" in r and r["synthesis_pred"] not in ("", None)]
        frac = (sum(r["synthesis_pred"] == r["pred"] for r in agree) / len(agree)) if agree else float("nan")
        out.append({"set": set_name, "group": groups.get(set_name, "InD"), "n": len(mine),
                    "synthesis_classified_as_guiding_label": frac,
                    "mean_diffguard_score": sum(float(r["diffguard"]) for r in mine) / len(mine)})
    return out


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def interval(entry: dict) -> str:
    """AUROC with its interval; results.json bootstraps the headline detectors only (the others: the point)."""
    if "auroc_ci" not in entry:
        return pct(entry["auroc"])
    ci = entry["auroc_ci"]
    return f"{pct(entry['auroc'])} [{pct(ci['lo'])}, {pct(ci['hi'])}]"


def difference(entry: dict) -> str:
    """A paired difference ``{"point", "lo", "hi"}`` in points of %: ``+1.2 [-0.3, +2.8]``."""
    return f"{100 * entry['point']:+.1f} [{100 * entry['lo']:+.1f}, {100 * entry['hi']:+.1f}]"


def main(argv: list) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "claims")
    parser.add_argument("--full", action="store_true", help="every test image (limit_per_set=null)")
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out (e.g. finetune,cotrain,joint)")
    args, extra = parser.parse_known_args(argv)
    limit = ["limit_per_set=null"] if args.full else []
    skip = set(filter(None, args.skip.split(",")))
    gdm, free = "--config=conf/fashion_gdm.yaml", "--config=conf/fashion_classifier_free.yaml"
    runs = {"gdm": run(args.out / "gdm", gdm, "oracle=both", *limit, *extra)}
    groups = {s: g for s, g in runs["gdm"]["groups"].items()} if "groups" in runs["gdm"] else None
    if groups is None:  # results.json does not carry the groups: take them from the preset's benchmark
        groups = {name: ("near" if name == "fashion_6to9" else "far") for name in runs["gdm"]["num_samples"]
                  if name != "ind"}
    plans = {
        "classifier_free": (free, "oracle=paper"),
        "classifier_free_dsg": (free, "diffguard.guidance.classifier_free.dsg=true"),  # the preset runs DSG off
        "aes": (gdm, f"--config={args.out / 'aes_calibration' / 'aes.yaml'}"),
    }
    missing = []
    for name in ("finetune", "cotrain", "joint"):
        folder = ROOT / "outputs" / "cotrain_fashion" / name
        if not (folder / "classifier").is_dir():
            if name not in skip:
                missing.append(f"{name}: no {folder / 'classifier'} (python train.py --config "
                               f"conf/train_fashion_{name}.yaml makes it)")
            continue
        models = [f"models.classifier={folder / 'classifier'}"]
        if name == "joint":
            models.append(f"models.diffusion={folder / 'diffusion'}")
        plans[name] = (gdm, "oracle=paper", *models)
    if "aes" not in skip and not (args.out / "aes_calibration" / "aes.yaml").is_file():
        subprocess.run([sys.executable, "-m", "diffguard_pl.jobs.calibration", gdm, "calibration.method=quantile",
                        "calibration.target=0.5", f"output_dir={args.out / 'aes_calibration'}", *extra],
                       check=True, cwd=ROOT)
    for name, plan in plans.items():
        if name in skip:
            continue
        runs[name] = run(args.out / name, *plan, *limit, *extra)

    main_run = runs["gdm"]
    lines = ["## Every detector (test splits; AUROC [95% bootstrap interval; headline detectors only], FPR@95 classic, "
             "in %)", "",
             "| detector | near AUROC | near FPR@95 | far AUROC | far FPR@95 |", "|---|---:|---:|---:|---:|"]
    for name, entry in main_run["detectors"].items():
        if "/" in name.replace("oracle-paper/", "").replace("oracle-ind/", "") and not name.startswith("diffguard/"):
            continue
        lines.append(f"| `{name}` | {interval(entry['near'])} | {pct(entry['near']['fpr95_classic'])} | "
                     f"{interval(entry['far'])} | {pct(entry['far']['fpr95_classic'])} |")
    lines += ["", "## Paired differences of AUROC on the same test samples (points, [95% interval])", "",
              "| comparison | near | far |", "|---|---:|---:|"]
    for pair, entry in main_run.get("comparisons", {}).items():
        lines.append(f"| `{pair}` (gdm run) | {difference(entry['near'])} | {difference(entry['far'])} |")
    scores = {name: read_scores(args.out / name) for name in runs}
    compared = {}
    for name in runs:
        if name == "gdm":
            continue
        compared[name] = paired_runs(scores[name], scores["gdm"], "diffguard", "diffguard", groups)
        lines.append(f"| `diffguard`: {name} - gdm | {difference(compared[name]['near'])} | "
                     f"{difference(compared[name]['far'])} |")
        if "oracle-paper/diffguard" in next(iter(scores[name].values())):
            oracle = paired_runs(scores[name], scores[name], "oracle-paper/diffguard", "diffguard", groups)
            compared[f"{name}: oracle-paper - diffguard"] = oracle
            lines.append(f"| {name}: `oracle-paper/diffguard - diffguard` | {difference(oracle['near'])} | "
                         f"{difference(oracle['far'])} |")
    # DiffGuard alone against MSP, in every run (the paper: DiffGuard beats MSP on far-OOD and where MSP fails)
    for name in runs:
        pair = compared[f"{name}: diffguard - msp"] = paired_runs(scores[name], scores[name], "diffguard", "msp",
                                                                  groups)
        mnist = f" (MNIST {difference(pair['mnist'])})" if "mnist" in pair else ""
        lines.append(f"| {name}: `diffguard - msp`{mnist} | {difference(pair['near'])} | {difference(pair['far'])} |")
    # co-training against fine-tuning on real images alone; DSG on against off
    for name, base in (("cotrain", "finetune"), ("joint", "finetune"), ("classifier_free_dsg", "classifier_free")):
        if name in runs and base in runs:
            pair = compared[f"{name} - {base}"] = paired_runs(scores[name], scores[base], "diffguard", "diffguard",
                                                               groups)
            lines.append(f"| `diffguard`: {name} - {base} | {difference(pair['near'])} | {difference(pair['far'])} |")
    diag = diagnosis(scores["gdm"], groups)
    lines += ["", "## Mechanism: how often the guided synthesis is classified as its guiding label", "",
              "| set | group | test samples | synthesis classified as the guiding label | mean `diffguard` score |",
              "|---|---|---:|---:|---:|"]
    for row in diag:
        lines.append(f"| {row['set']} | {row['group']} | {row['n']} | "
                     f"{pct(row['synthesis_classified_as_guiding_label'])}% | {row['mean_diffguard_score']:.3g} |")
    if missing:
        lines += ["", "Not run (models missing): " + "; ".join(missing)]
    lines += ["", "InD accuracy per run: " + ", ".join(f"{n} {pct(r['id_accuracy'])}%" for n, r in runs.items())]
    text = "\n".join(lines)
    print(text)
    (args.out / "claims.md").write_text(text + "\n")
    summary = {"runs": {n: {"near": r["detectors"]["diffguard"]["near"], "far": r["detectors"]["diffguard"]["far"],
                            "id_accuracy": r["id_accuracy"]} for n, r in runs.items()},
               "comparisons": main_run.get("comparisons", {}), "runs_vs_gdm": compared, "diagnosis": diag}
    (args.out / "claims.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
