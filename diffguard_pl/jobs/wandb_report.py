"""What an evaluation sends to its logger: results.json's numbers as flat metrics and, for W&B, as tables.

Flat metrics (:func:`flat_metrics`), one value per run:

- ``id_accuracy``; ``throughput/<key>``;
- ``<detector>/<near|far>_<metric>``: the group means (auroc, fpr95_classic, fpr95_openood) and, for the
  headline detectors, ``<detector>/<near|far>_auroc_lo`` / ``_auroc_hi``, the 95% bootstrap interval;
- ``<detector>/<set>_<metric>``: every per-set metric of results.json (auroc, both FPR@95, the four AUPRs) and
  the interval as ``_auroc_lo`` / ``_auroc_hi``;
- ``comparisons/<a - b>/<near|far>_auroc_diff`` with ``_lo`` / ``_hi``: the paired differences;
- ``synthesis_follows_label/<set>``, ``reference_follows_label/<set>``, ``round_trip_psnr/<set>`` (dB) when
  the run has them.

NaN values (the means of a group without sets) are left out.

Tables (:func:`result_tables`): ``results/per_set`` (a row per detector and OOD set), ``results/near_far`` (a row
per detector and group) and ``results/comparisons`` (a row per comparison and group).

Units: every rate (AUROC, FPR@95, AUPR, InD accuracy, the ``..._follows_label`` shares) is a fraction in [0, 1],
as in results.json (the console's table prints them in %, and the run's notes and its console line say so:
diffguard_pl/jobs/wandb_run.py); ``round_trip_psnr`` in dB; throughput as results.json has it.

W&B keeps the flat metrics in the run summary: they are one value per run, not a history, so W&B draws no
one-point sparklines for them; any other Lightning logger (CSV) gets them as one row.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Mapping, Tuple

from diffguard_pl.data.benchmark import IND
from diffguard_pl.records.columns import ROUND_TRIP_PSNR

PER_SET = ("auroc", "auroc_lo", "auroc_hi", "fpr95_classic", "fpr95_openood", "aupr_in", "aupr_out",
           "aupr_in_openood", "aupr_out_openood")
NEAR_FAR = ("auroc", "auroc_lo", "auroc_hi", "fpr95_classic", "fpr95_openood")
PER_SET_DIAGNOSTICS = ("synthesis_follows_label", "reference_follows_label", ROUND_TRIP_PSNR)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_values(metrics: Mapping[str, object]) -> Iterator[Tuple[str, float]]:
    """(name, value) of one entry of results.json's detectors: its numbers, and ``auroc_ci`` as ``auroc_lo`` /
    ``auroc_hi``."""
    for key, value in metrics.items():
        if key == "auroc_ci":
            yield "auroc_lo", value["lo"]
            yield "auroc_hi", value["hi"]
        elif _number(value):
            yield key, value


def flat_metrics(results: Mapping[str, object]) -> Dict[str, float]:
    """results.json's numbers as ``{key: value}`` (the keys in the module docstring)."""
    flat = {"id_accuracy": results["id_accuracy"]}
    flat.update({f"throughput/{k}": v for k, v in results.get("throughput", {}).items() if _number(v)})
    for name, entry in results["detectors"].items():
        for group in ("near", "far"):
            flat.update({f"{name}/{group}_{k}": v for k, v in metric_values(entry[group])})
        for set_name, metrics in entry["per_ood"].items():
            flat.update({f"{name}/{set_name}_{k}": v for k, v in metric_values(metrics)})
    for pair, entry in results.get("comparisons", {}).items():
        for group, d in entry.items():
            flat.update({f"comparisons/{pair}/{group}_auroc_diff": d["point"],
                         f"comparisons/{pair}/{group}_auroc_diff_lo": d["lo"],
                         f"comparisons/{pair}/{group}_auroc_diff_hi": d["hi"]})
    for name in PER_SET_DIAGNOSTICS:
        flat.update({f"{name}/{s}": v for s, v in results.get(name, {}).items()})
    return {k: v for k, v in flat.items() if not math.isnan(v)}  # NaN: e.g. the means of a group without sets


def result_tables(results: Mapping[str, object]) -> Dict[str, Tuple[List[str], List[list]]]:
    """``{key: (columns, rows)}`` of the tables in the module docstring (None where a value is missing)."""
    groups, counts = results.get("groups", {}), results.get("num_samples", {})
    per_set, near_far = [], []
    for name, entry in results["detectors"].items():
        for set_name, metrics in entry["per_ood"].items():
            values = dict(metric_values(metrics))
            per_set.append([name, set_name, groups.get(set_name), counts.get(IND), counts.get(set_name)]
                           + [values.get(k) for k in PER_SET])
        for group in ("near", "far"):
            values = dict(metric_values(entry[group]))
            if not all(isinstance(v, float) and math.isnan(v) for v in values.values()):  # a group with no set
                near_far.append([name, group] + [values.get(k) for k in NEAR_FAR])
    comparisons = [[pair, group, d["point"], d["lo"], d["hi"]]
                   for pair, entry in results.get("comparisons", {}).items() for group, d in entry.items()]
    return {
        "results/per_set": (["detector", "set", "group", "ind_samples", "ood_samples", *PER_SET], per_set),
        "results/near_far": (["detector", "group", *NEAR_FAR], near_far),
        "results/comparisons": (["comparison", "group", "auroc_diff", "lo", "hi"], comparisons),
    }


def log_results(logger, results: Mapping[str, object]) -> None:
    """Send results.json's numbers to the job's Lightning logger: with W&B the flat metrics into the run summary
    and the tables as ``wandb.Table``; with any other logger the flat metrics as one row."""
    flat = flat_metrics(results)
    if type(logger).__name__ != "WandbLogger":
        logger.log_metrics(flat)
        return
    import wandb

    run = logger.experiment
    run.summary.update(flat)
    run.log({key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in result_tables(results).items()})
