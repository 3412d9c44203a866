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
ORACLE_PREFIX = "oracle-"  # oracle-<mode>/<detector>, see diffguard_pl/oracle.py
META_COLUMNS = ("id", "set", "split", "label", "pred", "depth", "unet_evals")
# Averaged over the near / far groups: AUROC and both FPR@95 conventions (see diffguard_pl/metrics.py).
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


def _select(records: Mapping[str, list], split: str, set_name: str, column: str) -> torch.Tensor:
    values = [v for v, sp, s in zip(records[column], records["split"], records["set"]) if sp == split and s == set_name]
    return torch.tensor(values, dtype=torch.float64)


def add_derived_detectors(records: Dict[str, list], score: str, partners: Sequence[str] = ("ebo",)) -> List[str]:
    """Add ``diffguard`` (the configured distance) and ``diffguard+X`` for each partner X (z-scores summed).

    The z-score normalisation of every detector is fitted on the InD validation split only; oracle variants
    (``oracle-<mode>/...``) get the same normalisation. With fewer than two InD validation samples (a small
    ``shard=i/n`` slice) the fused detectors cannot be fitted and are left out; the returned notes say so.
    """
    prefixes = [""] + sorted({c.split("/")[0] + "/" for c in records if c.startswith(ORACLE_PREFIX)})
    for prefix in prefixes:
        source = f"{prefix}{DIFFGUARD}/{score}"
        if source in records:
            records[f"{prefix}{DIFFGUARD}"] = list(records[source])
    val_dg = _select(records, "val", IND, f"{DIFFGUARD}/{score}")
    if len(val_dg) < 2:
        return [f"fused detectors left out: their normalisation needs at least 2 InD validation samples, "
                f"got {len(val_dg)}"]
    norm = {DIFFGUARD: (float(val_dg.mean()), float(val_dg.std()) or 1.0)}
    for partner in partners:
        values = _select(records, "val", IND, partner)
        norm[partner] = (float(values.mean()), float(values.std()) or 1.0)
    for prefix in prefixes:
        if f"{prefix}{DIFFGUARD}" not in records:
            continue
        for partner in partners:
            (mu_d, sd_d), (mu_p, sd_p) = norm[DIFFGUARD], norm[partner]
            records[f"{prefix}{DIFFGUARD}+{partner}"] = [
                (d - mu_d) / sd_d + (p - mu_p) / sd_p for d, p in zip(records[f"{prefix}{DIFFGUARD}"], records[partner])
            ]
    return []


def detector_columns(records: Mapping[str, list]) -> List[str]:
    return [c for c in records if c not in META_COLUMNS]


def summarize(records: Mapping[str, list], groups: Mapping[str, str], split: str = "test") -> dict:
    """results.json content (without throughput): accuracy, per-set and near / far metrics per detector.

    ``groups`` maps each OOD set name to "near" or "far"; only records of ``split`` count. Per set:
    every key of ``ood_metrics``; near / far: the means of ``NEAR_FAR_KEYS`` over the group's sets.
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
                for key in NEAR_FAR_KEYS
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
    """Detectors by rows; per-set AUROC (full set names), then near / far AUROC, FPR@95 classic and OpenOOD (%)."""
    sets = list(groups)
    labels = {"auroc": "AUROC", "fpr95_classic": "FPR@95 classic", "fpr95_openood": "FPR@95 OpenOOD"}
    header = ["detector"] + sets + [f"{g} {labels[k]}" for g in ("near", "far") for k in NEAR_FAR_KEYS]
    rows = []
    for name, entry in result["detectors"].items():
        cells = [name] + [f"{100 * entry['per_ood'][s]['auroc']:.1f}" if s in entry["per_ood"] else "-" for s in sets]
        cells += [f"{100 * entry[g][k]:.1f}" for g in ("near", "far") for k in NEAR_FAR_KEYS]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    lines.append("all values in %; per-set columns: AUROC. FPR@95 classic: OOD accepted when 95% of InD is kept "
                 "(InD positive, the paper's); FPR@95 OpenOOD: InD flagged when 95% of OOD is detected "
                 "(OOD positive, OpenOOD v1.5's leaderboard)")
    lines.append(f"InD accuracy: {100 * result['id_accuracy']:.2f}%")
    if "throughput" in result:
        tp = result["throughput"]
        lines.append(f"throughput: {tp['images_per_second']:.2f} images/s, {tp['unet_evals_per_image']:.1f} UNet evaluations per image")
    return "\n".join(lines)
