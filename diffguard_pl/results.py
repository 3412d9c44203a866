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
from diffguard_pl.metrics import ood_metrics

DIFFGUARD = "diffguard"
FUSED = "diffguard+ebo"
ORACLE = "oracle/"
META_COLUMNS = ("id", "set", "split", "label", "pred", "depth", "unet_evals")


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


def _select(records: Mapping[str, list], split: str, set_name: str, column: str) -> torch.Tensor:
    values = [v for v, sp, s in zip(records[column], records["split"], records["set"]) if sp == split and s == set_name]
    return torch.tensor(values, dtype=torch.float64)


def add_derived_detectors(records: Dict[str, list], score: str) -> List[str]:
    """Add ``diffguard`` (the configured distance) and ``diffguard+ebo`` (z-scores summed).

    The z-score normalisation of both detectors is fitted on the InD
    validation split only; oracle variants get the same normalisation. With
    fewer than two InD validation samples (a small ``shard=i/n`` slice) the
    fused detector cannot be fitted and is left out; the returned notes say so.
    """
    for prefix in ("", ORACLE):
        source = f"{prefix}{DIFFGUARD}/{score}"
        if source in records:
            records[f"{prefix}{DIFFGUARD}"] = list(records[source])
    val_dg, val_ebo = _select(records, "val", IND, f"{DIFFGUARD}/{score}"), _select(records, "val", IND, "ebo")
    if len(val_dg) < 2:
        return [f"{FUSED} left out: its normalisation needs at least 2 InD validation samples, got {len(val_dg)}"]
    norm = {name: (float(v.mean()), float(v.std()) or 1.0) for name, v in (("dg", val_dg), ("ebo", val_ebo))}
    for prefix in ("", ORACLE):
        if f"{prefix}{DIFFGUARD}" not in records:
            continue
        records[f"{prefix}{FUSED}"] = [
            (dg - norm["dg"][0]) / norm["dg"][1] + (e - norm["ebo"][0]) / norm["ebo"][1]
            for dg, e in zip(records[f"{prefix}{DIFFGUARD}"], records["ebo"])
        ]
    return []


def detector_columns(records: Mapping[str, list]) -> List[str]:
    return [c for c in records if c not in META_COLUMNS]


def summarize(records: Mapping[str, list], groups: Mapping[str, str], split: str = "test") -> dict:
    """results.json content (without throughput): accuracy, per-set and near / far metrics per detector.

    ``groups`` maps each OOD set name to "near" or "far"; only records of ``split`` count.
    """
    ind_label = _select(records, split, IND, "label")
    ind_pred = _select(records, split, IND, "pred")
    result = {
        "id_accuracy": float((ind_label == ind_pred).double().mean()) if len(ind_label) else float("nan"),
        "detectors": {},
        "num_samples": {IND: len(ind_label), **{s: len(_select(records, split, s, "label")) for s in groups}},
    }
    for detector in detector_columns(records):
        ind = _select(records, split, IND, detector)
        per_ood = {s: ood_metrics(ind, _select(records, split, s, detector)) for s in groups
                   if result["num_samples"][s] > 0}
        entry = {"per_ood": per_ood}
        for group in ("near", "far"):
            members = [per_ood[s] for s in per_ood if groups[s] == group]
            entry[group] = {
                key: (sum(m[key] for m in members) / len(members) if members else float("nan"))
                for key in ("auroc", "fpr95")
            }
        result["detectors"][detector] = entry
    return result


def finalize(records: Dict[str, list], score: str, groups: Mapping[str, str], split: str, seconds: float,
             new_images: int) -> dict:
    """Derived detectors, metrics and throughput (over the ``new_images`` evaluated in ``seconds``)."""
    notes = add_derived_detectors(records, score)
    result = summarize(records, groups, split)
    if notes:
        result["notes"] = notes
    n = len(records["id"])
    result["throughput"] = {
        "images_per_second": new_images / seconds if seconds > 0 and new_images else float("nan"),
        "unet_evals_per_image": sum(records["unet_evals"]) / max(n, 1),
        "seconds": seconds,
        "images": new_images,
    }
    return result


def write_scores_csv(records: Mapping[str, list], path: str | Path) -> None:
    columns = list(records.keys())
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


def format_table(result: dict, groups: Mapping[str, str]) -> str:
    """Detectors by rows; per-set AUROC, near / far AUROC and FPR@95 by columns (percent)."""
    sets = list(groups)
    header = ["detector"] + [f"{s[:10]}" for s in sets] + ["near AUROC", "near FPR95", "far AUROC", "far FPR95"]
    rows = []
    for name, entry in result["detectors"].items():
        cells = [name] + [f"{100 * entry['per_ood'][s]['auroc']:.1f}" if s in entry["per_ood"] else "-" for s in sets]
        cells += [f"{100 * entry[g][k]:.1f}" for g in ("near", "far") for k in ("auroc", "fpr95")]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    lines.append(f"InD accuracy: {100 * result['id_accuracy']:.2f}%  (per-set columns: AUROC %)")
    if "throughput" in result:
        tp = result["throughput"]
        lines.append(f"throughput: {tp['images_per_second']:.2f} images/s, {tp['unet_evals_per_image']:.1f} UNet evaluations per image")
    return "\n".join(lines)
