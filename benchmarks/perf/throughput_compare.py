"""``--compare OUT_A OUT_B``: two evaluate.py output folders of the same benchmark side by side, e.g. one run in
fp32 and one under bf16 autocast (benchmarks/perf/gpu_check.sh compares them so).

Prints near / far AUROC and near FPR@95 of both runs for DiffGuard's detectors, MSP and EBO (the report holds every
detector both runs have), and per DiffGuard score column its gaps over the samples both scored (largest absolute
gap, median relative gap, Spearman rank correlation) and how many predictions agree. Reads results.json and
scores.csv only; no model runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import torch


def compare_results(dir_a: str, dir_b: str) -> dict:
    """AUROC / FPR@95 of two evaluate.py runs of the same benchmark (e.g. fp32 and bf16) and their score gaps."""

    def load(folder):
        results = json.loads((Path(folder) / "results.json").read_text())
        with open(Path(folder) / "scores.csv", newline="") as handle:
            rows = {row["id"]: row for row in csv.DictReader(handle)}
        return results, rows

    (res_a, rows_a), (res_b, rows_b) = load(dir_a), load(dir_b)
    report: dict = {"a": str(dir_a), "b": str(dir_b), "detectors": {}, "scores": {}}
    print(f"{'detector':26s} {'near AUROC a / b':>18s} {'far AUROC a / b':>18s} {'near FPR@95 classic a / b':>26s}")
    for name, entry in res_a["detectors"].items():
        if name not in res_b["detectors"]:
            continue
        other = res_b["detectors"][name]
        values = {f"{g}_{k}": (entry[g].get(k), other[g].get(k)) for g in ("near", "far")
                  for k in ("auroc", "fpr95_classic", "fpr95_openood")}
        report["detectors"][name] = values
        if name.startswith("diffguard") or name in ("msp", "ebo"):
            fmt = lambda pair: f"{100 * pair[0]:.2f} / {100 * pair[1]:.2f}" if None not in pair else "-"
            print(f"{name:26s} {fmt(values['near_auroc']):>18s} {fmt(values['far_auroc']):>18s} "
                  f"{fmt(values['near_fpr95_classic']):>26s}")
    common = sorted(set(rows_a) & set(rows_b))
    columns = [c for c in next(iter(rows_a.values())) if c.startswith("diffguard/")]
    for column in columns:
        a = torch.tensor([float(rows_a[i][column]) for i in common], dtype=torch.float64)
        b = torch.tensor([float(rows_b[i][column]) for i in common], dtype=torch.float64)
        rel = (a - b).abs() / a.abs().clamp_min(1e-12)
        ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
        report["scores"][column] = {"max_abs": float((a - b).abs().max()), "median_rel": float(rel.median()),
                                    "spearman": float(torch.corrcoef(ranks)[0, 1])}
    same_pred = sum(rows_a[i]["pred"] == rows_b[i]["pred"] for i in common)
    report["samples"], report["same_prediction"] = len(common), same_pred
    report["throughput"] = {"a": res_a.get("throughput"), "b": res_b.get("throughput")}
    print(f"{len(common)} samples, same prediction for {same_pred}; score gaps (median relative, Spearman): "
          + ", ".join(f"{c.split('/')[1]} {v['median_rel']:.2e} {v['spearman']:.4f}"
                      for c, v in report["scores"].items()))
    return report


def compare(dir_a: str, dir_b: str, json_path: Optional[str] = None) -> dict:
    """:func:`compare_results`, written to ``json_path`` as well when given."""
    report = compare_results(dir_a, dir_b)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report
