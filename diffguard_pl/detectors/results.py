"""From per-sample records to the numbers a paper cites.

Records are columns (dict of equal-length lists): ``id``, ``set``, ``split``,
``label``, ``pred``, ``depth``, ``unet_evals`` and one column per detector
score (higher = more OOD). Metrics use only ``split == "test"`` records;
the fused detector's normalisation uses only InD ``split == "val"`` records.
Intervals are keyed objects: ``auroc_ci`` is ``{"lo", "hi"}`` and each paired comparison
``{"point", "lo", "hi"}``. ``scores.csv`` comes with ``columns.json``, what every column means (sign, unit).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.bootstrap import REPLICATES, group_mean, interval, paired_difference, replicate_aurocs
from diffguard_pl.detectors import registry
from diffguard_pl.detectors.fused import add_derived_detectors, detector_columns, select
from diffguard_pl.detectors.metrics import ood_metrics
from diffguard_pl.detectors.registry import AGAINST_INPUT, DIFFGUARD, ORACLE_PREFIX, distance_column, fused_partner

# Averaged over the near / far groups: AUROC and both FPR@95 conventions (see diffguard_pl/detectors/metrics.py).
NEAR_FAR_KEYS = ("auroc", "fpr95_classic", "fpr95_openood")


def _mean(values) -> float:
    """The mean, exactly rounded whatever the samples' order (a resumed or merged run orders them differently)."""
    values = values.tolist()
    return math.fsum(values) / len(values) if values else float("nan")


def auroc_interval(lo_hi: Tuple[float, float]) -> dict:
    """A bootstrap interval as results.json keeps it: ``{"lo": 2.5%, "hi": 97.5%}``."""
    lo, hi = lo_hi
    return {"lo": lo, "hi": hi}


def paired(point_lo_hi: Tuple[float, float, float]) -> dict:
    """A paired difference as results.json keeps it: ``{"point": estimate, "lo": 2.5%, "hi": 97.5%}``."""
    point, lo, hi = point_lo_hi
    return {"point": point, "lo": lo, "hi": hi}


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
                entry[group]["auroc_ci"] = auroc_interval(interval(group_mean(draws, members)))
        if draws is not None:
            for s in present:
                per_ood[s]["auroc_ci"] = auroc_interval(interval(draws[s]))
        result["detectors"][detector] = entry
    result["comparisons"] = comparisons(records, groups, split, replicates)
    if "synthesis_pred" in records:
        result["synthesis_follows_label"] = synthesis_agreement(records, [IND] + present, split)
    if "round_trip_psnr" in records:  # the unguided reference: how well each set's walk returns unguided
        result["round_trip_psnr"] = {s: _mean(select(records, split, s, "round_trip_psnr"))
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
    partner alone, and each oracle against DiffGuard: ``{"a - b": {"near": {"point", "lo", "hi"}, "far": ...}}``."""
    pairs = [(c, fused_partner(c)) for c in records if fused_partner(c)]
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
                entry[group] = paired(paired_difference(*scores[a], *scores[b], members, replicates))
        out[f"{a} - {b}"] = entry
    return out


def finalize(records: Dict[str, list], score: str, groups: Mapping[str, str], split: str,
             partners: Sequence[str] = registry.FUSION_DEFAULT) -> dict:
    """Derived detectors (added to ``records``) and every metric of results.json."""
    notes = add_derived_detectors(records, score, partners)
    result = summarize(records, groups, split)
    if notes:
        result["notes"] = notes
    return result


class Distance(NamedTuple):
    symbol: str  # what a plot's label calls it
    meaning: str
    unit: str
    suffix: str = ""  # after a value in a label


# Every DiffGuard distance (diffguard_pl/method/scores.py), oriented like every score: higher = more OOD.
DISTANCES = {
    "l1": Distance("L1", "mean absolute pixel difference", "intensity on [0, 1]"),
    "l2": Distance("L2", "mean squared pixel difference", "squared intensity on [0, 1]"),
    "psnr": Distance("-PSNR", "minus the PSNR (peak 1)", "dB, negated: -30 is a PSNR of 30 dB", " dB"),
    "ssim": Distance("1 - SSIM", "one minus SSIM (Gaussian window 11, sigma 1.5)", "unitless, 0 = identical"),
    "logit_l1": Distance("logit L1", "mean absolute difference of the classifier's logits", "logits"),
    "feature_cos": Distance("1 - cos", "one minus the cosine similarity of the classifier's penultimate features",
                            "unitless, 0 to 2"),
    "contrastive": Distance("1 - cos (contrastive)", "one minus the cosine similarity of the contrastive "
                            "encoder's features (models.encoder)", "unitless, 0 to 2"),
    "dists": Distance("DISTS", "DISTS distance (piq)", "unitless, 0 = identical"),
    "lpips": Distance("LPIPS", "LPIPS distance (piq)", "unitless, 0 = identical"),
}
META_MEANINGS = {
    "id": ("the sample's stable id", None),
    "set": ("ind or the OOD set's name", None),
    "split": ("val or test: metrics use the evaluated split (test unless split=val), the fused detectors' "
              "normalisation InD val", None),
    "label": ("the InD class (its position in data.ind_classes); -1 for OOD samples", "class index"),
    "pred": ("the classifier's prediction on the input: the label that guides the synthesis", "class index"),
    "synthesis_pred": ("the classifier's prediction on the guided synthesis", "class index"),
    "reference_pred": ("the classifier's prediction on the unguided reconstruction (diffguard.reference=unguided)",
                       "class index"),
    "round_trip_psnr": ("PSNR of the unguided reconstruction against the input: how well the walk returns without "
                        "guidance (diffguard.reference=unguided; higher = closer)", "dB"),
    "depth": ("inversion steps taken (adaptive early stop ends some early; diffguard.depth is the most)", "steps"),
    "unet_evals": ("denoiser evaluations spent on the sample", "evaluations"),
}
MORE_OOD = "higher = more OOD"
REFERENCES = {"input": "the input", "unguided": "the unguided reconstruction (from the same latent)"}


def describe_column(column: str, score: Optional[str] = None, reference: Optional[str] = None) -> dict:
    """What a scores.csv column holds: ``{"meaning", "unit", "direction"}`` (direction None for meta columns).

    ``score`` (diffguard.score) and ``reference`` (diffguard.reference) make the DiffGuard entries concrete;
    without them they name the config keys. A column no rule knows gets meaning None.
    """
    if column in META_MEANINGS:
        meaning, unit = META_MEANINGS[column]
        return {"meaning": meaning, "unit": unit, "direction": None}
    if column.startswith(ORACLE_PREFIX) and "/" in column:
        mode, detector = column[len(ORACLE_PREFIX):].split("/", 1)
        entry = describe_column(detector, score, reference)
        if entry["meaning"] is not None:
            entry["meaning"] += f"; the synthesis guided by the {mode} oracle's label, not the prediction"
        return entry
    if registry.is_classifier_detector(column):
        entry = registry.classifier_detector(column)
        return {"meaning": f"classifier detector: {entry.meaning}", "unit": entry.unit, "direction": MORE_OOD}
    if column == DIFFGUARD:
        if not score:
            return {"meaning": "DiffGuard's score: the values of diffguard/<diffguard.score in config.yaml>",
                    "unit": "that column's", "direction": MORE_OOD}
        entry = describe_column(distance_column(score), score, reference)
        return {**entry, "meaning": f"DiffGuard's score, the values of {distance_column(score)}: {entry['meaning']}"}
    if fused_partner(column):
        partner = fused_partner(column)
        return {"meaning": f"diffguard fused with {partner}: the sum of both z-scores, each normalised on the InD "
                           f"validation split", "unit": "z-score sum, unitless", "direction": MORE_OOD}
    if column.startswith(DIFFGUARD + "/"):
        distance = column[len(DIFFGUARD) + 1:]
        against_input = distance.endswith(AGAINST_INPUT)
        distance = distance.removesuffix(AGAINST_INPUT)
        if distance not in DISTANCES:
            return {"meaning": None, "unit": None, "direction": MORE_OOD}
        if against_input:
            versus = "the input (this run's reference is the unguided reconstruction; what reference=input scores)"
        else:
            versus = REFERENCES.get(reference, "the reference (diffguard.reference)")
        return {"meaning": f"{DISTANCES[distance].meaning} between the guided synthesis and {versus}",
                "unit": DISTANCES[distance].unit, "direction": MORE_OOD}
    return {"meaning": None, "unit": None, "direction": None}


def column_dictionary(columns: Sequence[str], score: Optional[str] = None,
                      reference: Optional[str] = None) -> Dict[str, dict]:
    """:func:`describe_column` of every column, in order (what ``columns.json`` holds)."""
    return {c: describe_column(c, score, reference) for c in columns}


def write_scores_csv(records: Mapping[str, list], path: str | Path, score: Optional[str] = None,
                     reference: Optional[str] = None) -> None:
    """One row per sample: the meta columns and every detector's score (the per-step curves stay in records/);
    beside it ``columns.json``, what each column means (see :func:`describe_column`)."""
    columns = [c for c in records if not c.startswith("curve/")]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in zip(*(records[c] for c in columns)):
            writer.writerow(row)
    dictionary = {"file": Path(path).name, "columns": column_dictionary(columns, score, reference)}
    (Path(path).parent / "columns.json").write_text(json.dumps(dictionary, indent=2))


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
        ci = metrics["auroc_ci"]
        value += f" [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]"
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
