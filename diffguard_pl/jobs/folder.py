"""Scoring a folder of unlabelled images: per-image scores, predictions and in / out decisions.

    python evaluate.py score_folder=/path/to/images [--config PRESET] [key=value ...]

The run scores the benchmark's InD validation split and the folder's images.
Each detector's threshold keeps 95% of the InD validation samples (a sample is
"in" when its score is at most the threshold: higher scores mean more OOD);
the thresholds are stored with the run in ``thresholds.json`` and applied to
the folder in ``folder_scores.csv`` (one row per image: id = ``folder/<path>``,
predicted label, every detector's score and its decision).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, Mapping

import torch

from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.fused import detector_columns

KEEP = 0.95
FOLDER = "folder"


def keep_threshold(ind_scores: torch.Tensor, keep: float = KEEP) -> float:
    """The smallest score t with at least ``keep`` of ``ind_scores`` <= t."""
    ordered = ind_scores.double().sort().values
    return float(ordered[max(math.ceil(keep * len(ordered)) - 1, 0)])


def thresholds_from(records: Mapping[str, list], keep: float = KEEP) -> Dict[str, float]:
    val = [i for i, (s, sp) in enumerate(zip(records["set"], records["split"])) if s == IND and sp == "val"]
    if len(val) < 20:
        raise ValueError(f"{len(val)} InD validation samples are too few to set a {keep:.0%} threshold (need 20+)")
    return {d: keep_threshold(torch.tensor([float(records[d][i]) for i in val]), keep)
            for d in detector_columns(records)}


def write_folder_scores(records: Mapping[str, list], output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    thresholds = thresholds_from(records)
    (output_dir / "thresholds.json").write_text(json.dumps(
        {"keep_ind_val": KEEP, "rule": "out when score > threshold", "thresholds": thresholds}, indent=2))
    detectors = list(thresholds)
    rows = [i for i, s in enumerate(records["set"]) if s == FOLDER]
    path = output_dir / "folder_scores.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "pred"] + detectors + [f"out/{d}" for d in detectors])
        for i in sorted(rows, key=lambda i: records["id"][i]):
            scores = [float(records[d][i]) for d in detectors]
            writer.writerow([records["id"][i], records["pred"][i], *scores,
                             *[int(v > thresholds[d]) for v, d in zip(scores, detectors)]])
    print(f"scored {len(rows)} images: {path} (thresholds keep {KEEP:.0%} of InD validation: "
          f"{output_dir / 'thresholds.json'})")
    return path
