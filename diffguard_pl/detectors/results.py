"""From per-sample records to the numbers a paper cites.

Records are columns (dict of equal-length lists): ``id``, ``set``, ``split``,
``label``, ``pred``, ``depth``, ``unet_evals`` and one column per detector
score (higher = more OOD). Metrics use only ``split == "test"`` records;
the fused detector's normalisation uses only InD ``split == "val"`` records.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch

from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.bootstrap import REPLICATES, group_mean, interval, paired_difference, replicate_aurocs
from diffguard_pl.detectors.fused import (
    DIFFGUARD, FUSION_PARTNERS, ORACLE_PREFIX, add_derived_detectors, detector_columns, select,
)
from diffguard_pl.detectors.metrics import ood_metrics

# Averaged over the near / far groups: AUROC and both FPR@95 conventions (see diffguard_pl/detectors/metrics.py).
NEAR_FAR_KEYS = ("auroc", "fpr95_classic", "fpr95_openood")


def merge_records(parts: Sequence[Mapping[str, list]]) -> Dict[str, list]:
    """Concatenate record columns from several batches or ranks, keeping one record per sample id.

    A sample seen twice (a distributed sampler's padding) must carry the
    same values; the first copy is kept. Output is sorted by (split, set, id).
    """
    by_id: Dict[str, dict] = {}
    columns: List[str] = []
    for part in parts:
        if not part:
            continue
        columns = columns or list(part.keys())
        for i, sample_id in enumerate(part["id"]):
            if sample_id not in by_id:
                by_id[sample_id] = {c: part[c][i] for c in columns}
    rows = sorted(by_id.values(), key=lambda r: (r["split"], r["set"], r["id"]))
    return {c: [r[c] for r in rows] for c in columns}


def headline(detector: str) -> bool:
    """Detectors whose AUROC intervals are computed: each DiffGuard score, fused detector, baseline and oracle,
    not every distance variant (``diffguard/<distance>``)."""
    return "/" not in detector.split("/", 1)[-1] if detector.startswith(ORACLE_PREFIX) else "/" not in detector


def summarize(records: Mapping[str, list], groups: Mapping[str, str], split: str = "test",
              replicates: int = REPLICATES) -> dict:
    """results.json content (without throughput): accuracy, per-set and near / far metrics per detector.

    ``groups`` maps each OOD set name to "near" or "far"; only records of ``split`` count. Per set:
    every key of ``ood_metrics``; near / far: the means of ``NEAR_FAR_KEYS`` over the group's sets. For the
    headline detectors, ``auroc_ci``: a 95% bootstrap interval over test samples (diffguard_pl/detectors/bootstrap.py).
    """
    ind_label = select(records, split, IND, "label")
    ind_pred = select(records, split, IND, "pred")
    result = {
        "id_accuracy": float((ind_label == ind_pred).double().mean()) if len(ind_label) else float("nan"),
        "detectors": {},
        "num_samples": {IND: len(ind_label), **{s: len(select(records, split, s, "label")) for s in groups}},
        "groups": dict(groups),
        "intervals": f"95% percentile bootstrap over {split} samples, {replicates} replicates, seed 0",
    }
    present = [s for s in groups if result["num_samples"][s] > 0]
    for detector in detector_columns(records):
        ind = select(records, split, IND, detector)
        oods = {s: select(records, split, s, detector) for s in present}
        per_ood = {s: ood_metrics(ind, oods[s]) for s in present}
        entry = {"per_ood": per_ood}
        draws = replicate_aurocs(ind, oods, replicates) if headline(detector) and len(ind) and replicates else None
        for group in ("near", "far"):
            members = [s for s in per_ood if groups[s] == group]
            entry[group] = {
                key: (sum(per_ood[m][key] for m in members) / len(members) if members else float("nan"))
                for key in NEAR_FAR_KEYS
            }
            if draws is not None and members:
                entry[group]["auroc_ci"] = list(interval(group_mean(draws, members)))
        if draws is not None:
            for s in present:
                per_ood[s]["auroc_ci"] = list(interval(draws[s]))
        result["detectors"][detector] = entry
    result["comparisons"] = comparisons(records, groups, split, replicates)
    if "synthesis_pred" in records:
        result["synthesis_follows_label"] = synthesis_agreement(records, [IND] + present, split)
    if "round_trip_psnr" in records:  # the unguided reference: how well each set's walk returns unguided
        result["round_trip_psnr"] = {s: float(select(records, split, s, "round_trip_psnr").mean())
                                     for s in [IND] + present}
        result["reference_follows_label"] = synthesis_agreement(records, [IND] + present, split, "reference_pred")
    return result


def synthesis_agreement(records: Mapping[str, list], sets: Sequence[str], split: str = "test",
                        column: str = "synthesis_pred") -> Dict[str, float]:
    """Per set, how often the classifier calls the guided synthesis by the label that guided it (the
    prediction): the mechanism's premise is that this holds for InD inputs and fails for OOD ones.
    ``column="reference_pred"``: the same for the unguided reconstruction (the prediction kept without
    guidance)."""
    out = {}
    for s in sets:
        pred, again = select(records, split, s, "pred"), select(records, split, s, column)
        out[s] = float((pred == again).double().mean()) if len(pred) else float("nan")
    return out


def comparisons(records: Mapping[str, list], groups: Mapping[str, str], split: str = "test",
                replicates: int = REPLICATES) -> dict:
    """Paired bootstrap differences of near / far AUROC on the same samples: each fused detector against its
    partner alone, and each oracle against DiffGuard: ``{"a - b": {"near": [point, lo, hi], "far": ...}}``."""
    pairs = [(c, c.split("+", 1)[1]) for c in records if c.startswith(DIFFGUARD + "+")]
    pairs += [(c, DIFFGUARD) for c in records if c.startswith(ORACLE_PREFIX) and c.endswith("/" + DIFFGUARD)]
    out = {}
    present = [s for s in groups if len(select(records, split, s, "label"))]
    for a, b in pairs:
        if b not in records or not replicates:
            continue
        scores = {d: (select(records, split, IND, d), {s: select(records, split, s, d) for s in present})
                  for d in (a, b)}
        if not len(scores[a][0]):
            continue
        entry = {}
        for group in ("near", "far"):
            members = [s for s in present if groups[s] == group]
            if members:
                entry[group] = list(paired_difference(*scores[a], *scores[b], members, replicates))
        out[f"{a} - {b}"] = entry
    return out


def finalize(records: Dict[str, list], score: str, groups: Mapping[str, str], split: str,
             partners: Sequence[str] = FUSION_PARTNERS) -> dict:
    """Derived detectors (added to ``records``) and every metric of results.json."""
    notes = add_derived_detectors(records, score, partners)
    result = summarize(records, groups, split)
    if notes:
        result["notes"] = notes
    return result


def write_scores_csv(records: Mapping[str, list], path: str | Path) -> None:
    """One row per sample: the meta columns and every detector's score (the per-step curves stay in records/)."""
    columns = [c for c in records if not c.startswith("curve/")]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in zip(*(records[c] for c in columns)):
            writer.writerow(row)


def write_json(result: dict, path: str | Path) -> None:
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    Path(path).write_text(json.dumps(clean(result), indent=2))


def _cell(metrics: dict, key: str) -> str:
    value = f"{100 * metrics[key]:.1f}"
    if key == "auroc" and "auroc_ci" in metrics:
        lo, hi = metrics["auroc_ci"]
        value += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return value


def format_table(result: dict, groups: Mapping[str, str]) -> str:
    """Detectors by rows; per-set AUROC (full set names), then near / far AUROC, FPR@95 classic and OpenOOD (%)."""
    sets = list(groups)
    labels = {"auroc": "AUROC", "fpr95_classic": "FPR@95 classic", "fpr95_openood": "FPR@95 OpenOOD"}
    header = ["detector"] + sets + [f"{g} {labels[k]}" for g in ("near", "far") for k in NEAR_FAR_KEYS]
    rows = []
    for name, entry in result["detectors"].items():
        cells = [name] + [f"{100 * entry['per_ood'][s]['auroc']:.1f}" if s in entry["per_ood"] else "-" for s in sets]
        cells += [_cell(entry[g], k) for g in ("near", "far") for k in NEAR_FAR_KEYS]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    lines.append("all values in %; per-set columns: AUROC; [a, b]: 95% bootstrap interval over test samples. "
                 "FPR@95 classic: OOD accepted when 95% of InD is kept "
                 "(InD positive, the paper's); FPR@95 OpenOOD: InD flagged when 95% of OOD is detected "
                 "(OOD positive, OpenOOD v1.5's leaderboard)")
    lines.append(f"InD accuracy: {100 * result['id_accuracy']:.2f}%")
    if result.get("synthesis_follows_label"):
        rates = ", ".join(f"{s} {100 * v:.0f}%" for s, v in result["synthesis_follows_label"].items())
        lines.append(f"synthesis classified as its guiding label: {rates}")
    if "throughput" in result:
        tp = result["throughput"]
        rate = tp.get("images_per_second")
        speed = f"{rate:.2f} images/s in the test loop" if rate else "no image evaluated in this run"
        lines.append(f"throughput: {speed}, {tp['unet_evals_per_image']:.1f} UNet evaluations per image")
    return "\n".join(lines)
