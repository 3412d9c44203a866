"""From per-sample records to the numbers a paper cites, and the console's table of them.

Records are columns (dict of equal-length lists; every column declared in diffguard_pl/records/columns.py).
Metrics use only the evaluated split's records (test unless ``split=val``); the fused detectors' normalisation
uses only InD ``split == "val"`` records. Intervals are keyed objects: ``auroc_ci`` is ``{"lo", "hi"}`` and each
paired comparison ``{"point", "lo", "hi"}``.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple

from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.bootstrap import REPLICATES, group_mean, interval, paired_difference, replicate_aurocs
from diffguard_pl.detectors.fused import select
from diffguard_pl.detectors.metrics import ood_metrics
from diffguard_pl.records.columns import (DIFFGUARD, LABEL, ORACLE_PREFIX, PRED, REFERENCE_PRED, ROUND_TRIP_PSNR,
                                          SYNTHESIS_PRED, detector_columns, fused_partner)

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
    ind_label = select(records, split, IND, LABEL)
    ind_pred = select(records, split, IND, PRED)
    result = {
        "id_accuracy": float((ind_label == ind_pred).double().mean()) if len(ind_label) else float("nan"),
        "detectors": {},
        "num_samples": {IND: len(ind_label), **{s: len(select(records, split, s, LABEL)) for s in groups}},
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
    if SYNTHESIS_PRED in records:
        result["synthesis_follows_label"] = synthesis_agreement(records, [IND] + present, split)
    if ROUND_TRIP_PSNR in records:  # the unguided reference: how well each set's walk returns unguided
        result[ROUND_TRIP_PSNR] = {s: _mean(select(records, split, s, ROUND_TRIP_PSNR))
                                     for s in [IND] + present}
        result["reference_follows_label"] = synthesis_agreement(records, [IND] + present, split, REFERENCE_PRED)
    return result


def synthesis_agreement(records: Mapping[str, list], sets: Sequence[str], split: str = "test",
                        column: str = SYNTHESIS_PRED) -> Dict[str, float]:
    """Per set, how often the classifier calls the guided synthesis by the label that guided it (the
    prediction): the mechanism's premise is that this holds for InD inputs and fails for OOD ones.
    ``column="reference_pred"``: the same for the unguided reconstruction (the prediction kept without
    guidance)."""
    out = {}
    for s in sets:
        pred, again = select(records, split, s, PRED), select(records, split, s, column)
        out[s] = float((pred == again).double().mean()) if len(pred) else float("nan")
    return out


def comparisons(records: Mapping[str, list], groups: Mapping[str, str], split: str = "test",
                replicates: int = REPLICATES) -> dict:
    """Paired bootstrap differences of near / far AUROC on the same samples: each fused detector against its
    partner alone, and each oracle against DiffGuard: ``{"a - b": {"near": {"point", "lo", "hi"}, "far": ...}}``."""
    pairs = [(c, fused_partner(c)) for c in records if fused_partner(c)]
    pairs += [(c, DIFFGUARD) for c in records if c.startswith(ORACLE_PREFIX) and c.endswith("/" + DIFFGUARD)]
    out = {}
    present = [s for s in groups if len(select(records, split, s, LABEL))]
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
        extra = tp.get("diffusion_detectors_unet_evals_per_image")
        lines.append(f"throughput: {speed}, {tp['unet_evals_per_image']:.1f} UNet evaluations per image"
                     + (f" (DiffGuard) + {extra} (the diffusion detectors)" if extra else ""))
    return "\n".join(lines)
