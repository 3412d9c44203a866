"""Scoring a folder of unlabelled images: per-image scores, predictions and in / out decisions.

    python evaluate.py score_folder=/path/to/images [--config PRESET] [key=value ...]

The run scores the benchmark's InD validation split (``limit_per_set`` of it) and every image of the folder
(``score_folder_limit`` of them, chosen by id hash, when set). Before any model loads, the folder is listed and
every image decoded: an empty or missing folder, a file that cannot be used (refused with data.on_error=raise,
named and left out with skip), too few InD validation images for the thresholds, and images of another size or
channel count (converted to the benchmark's, and counted in results.json's ``folder``) are reported first.
Each detector's threshold keeps 95% of the InD validation samples (a sample is
"in" when its score is at most the threshold: higher scores mean more OOD);
the thresholds are stored with the run in ``thresholds.json`` and applied to
the folder in ``folder_scores.csv`` (one row per image: id = ``folder/<path>``,
the predicted class and its name, the recommended detector's score and decision first, then every other
detector's; ``folder_columns.json`` beside it says what each column means). The console ends with the verdict:
how many images are out at the recommended detector (``recommended``, a preset's choice), the most and least
OOD images by its score, and where the outputs are. A folder run's ``results.json`` holds what exists without
labelled OOD sets (:func:`folder_results`): no per-set metrics, no empty fields.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from diffguard_pl.data.benchmark import IND
from diffguard_pl.records.columns import DIFFGUARD, ID, LABEL, PRED, SET, SPLIT, describe_column, detector_columns

KEEP = 0.95
FOLDER = "folder"
MIN_VALIDATION = 20  # InD validation samples the 95% threshold needs at the least
MAX_NAMED = 10  # skipped files named on the console (results.json names them all)
SHOWN = 5  # the most and the least OOD images the verdict names, each
PRED_NAME = "pred_name"  # folder_scores.csv: the predicted class's name
OUT_PREFIX = "out/"  # folder_scores.csv: out/<detector>, 1 when the image's score is above the detector's threshold
RULE = "out when score > threshold"


@dataclass(frozen=True)
class FolderRun:
    """What the report needs of a scored folder beside its records."""

    report: dict  # :func:`inspect_folder`'s (results.json's ``folder``)
    recommended: str  # the detector the verdict reads (EvalConfig.recommended)
    class_names: Optional[Sequence[str]] = None  # the benchmark's, per predicted label; None: shown as the index


def inspect_folder(folder: str | Path, data) -> dict:
    """What scoring ``folder`` will do to its images, before any model loads: every image is opened and decoded
    (:func:`~diffguard_pl.data.image_files.verify` with the options the folder's set is built with, in
    ``data.decode_workers`` threads, whatever ``data.verify_files`` says), then its size and mode are counted,
    with how many are resized or change channel count. ConfigError when the folder is missing or holds
    no images. A file that cannot be used (it does not decode; a grayscale image in an RGB benchmark without
    ``data.allow_grayscale``) is a DataError naming every such file and the fix with ``data.on_error=raise``;
    with ``skip`` it is left out (as the folder's set leaves it out) and named in the report's ``problems``."""
    from PIL import Image

    from diffguard_pl.data.image_files import verify
    from diffguard_pl.data.image_lists import IMAGE_EXTENSIONS, read_image_folder
    from diffguard_pl.errors import ConfigError, DataError

    try:
        entries = read_image_folder(folder)
    except DataError as error:
        raise ConfigError(f"score_folder={folder}: {error}") from None
    if not entries:
        raise ConfigError(f"score_folder={folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); point it at a "
                          f"folder of images")
    problems = verify(entries, channels=data.channels, convert_grayscale=data.allow_grayscale or data.channels == 1,
                      on_error="skip", workers=data.decode_workers).problems
    bad = {p.file for p in problems}
    sizes: Dict[str, int] = {}
    resized = recoloured = 0
    for entry in entries:
        if entry.path in bad:
            continue
        with Image.open(entry.path) as image:  # decoded above: the header reads
            size, bands = image.size, len(image.getbands())
        key = f"{size[0]}x{size[1]} {'gray' if bands in (1, 2) else 'color'}"
        sizes[key] = sizes.get(key, 0) + 1
        resized += size != (data.resolution, data.resolution)
        recoloured += (bands in (1, 2)) != (data.channels == 1)
    if problems and data.on_error == "raise":
        shown = "; ".join(map(str, problems[:3])) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "")
        raise DataError(f"score_folder={folder}: {len(problems)} of its {len(entries):,} images cannot be used: "
                        f"{shown}. Replace or remove them, or set data.on_error=skip to score the others")
    channels = data.channels
    return {"folder": str(folder), "images": len(entries), "sizes": sizes, "resized": resized,
            "channels_converted": recoloured, "skipped": len(problems), "problems": [p.to_dict() for p in problems],
            "target": f"{data.resolution}x{data.resolution}, {channels} channel{'s' if channels > 1 else ''}"}


def describe_conversions(report: dict) -> str:
    """The console's account of the folder: its image sizes, what is converted and each file left out."""
    sizes = ", ".join(f"{n} of {key}" for key, n in sorted(report["sizes"].items(), key=lambda kv: -kv[1]))
    changes = []
    if report["resized"]:
        changes.append(f"{report['resized']} resized")
    if report["channels_converted"]:
        changes.append(f"{report['channels_converted']} converted to the benchmark's channel count")
    done = f"; to {report['target']}: {', '.join(changes)}" if changes else " (as the benchmark's images)"
    lines = [f"score_folder {report['folder']}: {report['images']:,} images ({sizes}){done}"]
    if report["skipped"]:
        lines.append(f"score_folder: {report['skipped']} of them left out (data.on_error=skip; listed in "
                     f"results.json's folder.problems):")
        lines += [f"  {p['file']}: {p['reason']}" for p in report["problems"][:MAX_NAMED]]
        if report["skipped"] > MAX_NAMED:
            lines.append(f"  ... and {report['skipped'] - MAX_NAMED} more")
    return "\n".join(lines)


def check_validation_count(available: int, limit: int | None) -> None:
    """ConfigError before any model work when the InD validation images the run scores are too few for the
    thresholds."""
    from diffguard_pl.errors import ConfigError

    count = available if limit is None else min(limit, available)
    if count < MIN_VALIDATION:
        raise ConfigError(f"score_folder needs at least {MIN_VALIDATION} InD validation images for its {KEEP:.0%} "
                          f"thresholds, and this run scores {count} (limit_per_set={limit}, {available} available): "
                          f"raise limit_per_set or set it to null")


def keep_threshold(ind_scores: torch.Tensor, keep: float = KEEP) -> float:
    """The smallest score t with at least ``keep`` of ``ind_scores`` <= t."""
    ordered = ind_scores.double().sort().values
    return float(ordered[max(math.ceil(keep * len(ordered)) - 1, 0)])


def thresholds_from(records: Mapping[str, list], keep: float = KEEP) -> Dict[str, float]:
    """Every detector's :func:`keep_threshold` on the InD validation records."""
    val = ind_validation(records)
    if len(val) < MIN_VALIDATION:
        raise ValueError(f"{len(val)} InD validation samples are too few to set a {keep:.0%} threshold "
                         f"(need {MIN_VALIDATION}+)")
    return {d: keep_threshold(torch.tensor([float(records[d][i]) for i in val]), keep)
            for d in detector_columns(records)}


def ind_validation(records: Mapping[str, list]) -> List[int]:
    return [i for i, (s, sp) in enumerate(zip(records[SET], records[SPLIT])) if s == IND and sp == "val"]


def folder_rows(records: Mapping[str, list]) -> List[int]:
    """The folder's records, by id."""
    return sorted((i for i, s in enumerate(records[SET]) if s == FOLDER), key=lambda i: records[ID][i])


def class_name(pred: int, class_names: Optional[Sequence[str]]) -> str:
    return str(class_names[pred]) if class_names is not None and 0 <= pred < len(class_names) else str(pred)


def verdict_detector(recommended: str, thresholds: Mapping[str, float]) -> tuple[str, Optional[str]]:
    """(the detector the verdict reads, a note when it is not ``recommended``): a recommended detector left out of
    the run (it cannot run on this classifier; results.json's notes and baselines say why) falls back to
    ``diffguard``."""
    if recommended in thresholds:
        return recommended, None
    return DIFFGUARD, (f"recommended={recommended} has no scores in this run (results.json's notes / "
                       f"baselines.left_out say why): the verdict reads {DIFFGUARD}")


def count_out(records: Mapping[str, list], rows: Sequence[int], thresholds: Mapping[str, float]) -> Dict[str, int]:
    """Per detector, how many of ``rows`` are out (score above the threshold)."""
    return {d: sum(float(records[d][i]) > t for i in rows) for d, t in thresholds.items()}


def compact(value):
    """``value`` without None, NaN and empty containers, at any depth (a folder run's results.json)."""
    if isinstance(value, dict):
        value = {k: compact(v) for k, v in value.items()}
        return {k: v for k, v in value.items() if not _empty(v)}
    if isinstance(value, list):
        return [v for v in map(compact, value) if not _empty(v)]
    return value


def _empty(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value in ({}, [])


def folder_results(records: Mapping[str, list], summary: Mapping, run: FolderRun,
                   thresholds: Mapping[str, float]) -> dict:
    """results.json of a folder run: the InD validation accuracy, the folder's report, the thresholds, how many
    images are out per detector, the recommended detector's verdict, throughput and what the benchmark run's
    results.json also says of the detectors' fitting (baselines, diffusion_detectors, notes); no per-set
    metrics (a folder has no labelled OOD sets) and no empty field."""
    val, rows = ind_validation(records), folder_rows(records)
    detector, note = verdict_detector(run.recommended, thresholds)
    counts = count_out(records, rows, thresholds)
    correct = [records[LABEL][i] == records[PRED][i] for i in val]
    results = {
        "ind_val_accuracy": sum(correct) / len(correct) if correct else None,
        "folder": {**run.report, "scored": len(rows)},
        "verdict": {"recommended": run.recommended, "detector": detector, "threshold": thresholds[detector],
                    "out": counts[detector], "images": len(rows), "note": note},
        "thresholds": {"keep_ind_val": KEEP, "rule": RULE, "ind_val_samples": len(val), "per_detector": thresholds},
        "out_per_detector": counts,
        **{k: summary.get(k) for k in ("throughput", "classifier_check", "baselines", "diffusion_detectors", "notes",
                                             "oracle", "data")},
    }
    return compact(results)


def folder_view(records: Mapping[str, list], run: FolderRun, thresholds: Mapping[str, float]) -> dict:
    """What the score histograms draw for a folder run (callbacks/score_plots.py ``FOLDER_VIEW``)."""
    detector, _ = verdict_detector(run.recommended, thresholds)
    return {"set": FOLDER, "label": f"folder '{Path(run.report['folder']).name}'", "thresholds": dict(thresholds),
            "first": [detector, DIFFGUARD]}


def write_folder_scores(records: Mapping[str, list], output_dir: str | Path, run: FolderRun,
                        thresholds: Mapping[str, float], score: Optional[str] = None,
                        reference: Optional[str] = None) -> Path:
    """``thresholds.json``, ``folder_scores.csv`` (the recommended detector's columns first) and
    ``folder_columns.json`` (what each of its columns means; ``score`` / ``reference``: diffguard.score /
    diffguard.reference, as for columns.json); returns the CSV's path."""
    output_dir = Path(output_dir)
    detector, _ = verdict_detector(run.recommended, thresholds)
    (output_dir / "thresholds.json").write_text(json.dumps(
        {"keep_ind_val": KEEP, "rule": RULE, "recommended": detector, "thresholds": dict(thresholds)}, indent=2))
    detectors = [detector] + [d for d in thresholds if d != detector]
    header = [ID, PRED, PRED_NAME, detector, OUT_PREFIX + detector] + detectors[1:] + \
        [OUT_PREFIX + d for d in detectors[1:]]
    path = output_dir / "folder_scores.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in folder_rows(records):
            scores = {d: float(records[d][i]) for d in detectors}
            outs = {d: int(scores[d] > thresholds[d]) for d in detectors}
            writer.writerow([records[ID][i], records[PRED][i], class_name(records[PRED][i], run.class_names),
                             scores[detector], outs[detector], *(scores[d] for d in detectors[1:]),
                             *(outs[d] for d in detectors[1:])])
    (output_dir / "folder_columns.json").write_text(json.dumps(
        {"file": path.name, "recommended": detector, "thresholds": "thresholds.json", "rule": RULE,
         "columns": folder_column_dictionary(header, detector, thresholds, score, reference)}, indent=2))
    return path


def folder_column_dictionary(header: Sequence[str], recommended: str, thresholds: Mapping[str, float],
                             score: Optional[str] = None, reference: Optional[str] = None) -> Dict[str, dict]:
    """What each column of folder_scores.csv means (``meaning``, ``unit``, ``direction``, as columns.json)."""
    out = {}
    for column in header:
        if column == PRED_NAME:
            entry = {"meaning": "the predicted class's name (the benchmark's class names; the index when it has "
                                "none)", "unit": None, "direction": None}
        elif column.startswith(OUT_PREFIX):
            d = column[len(OUT_PREFIX):]
            entry = {"meaning": f"1 when the image's {d} score is above its threshold {thresholds[d]:.6g} (keeps "
                                f"{KEEP:.0%} of InD validation; thresholds.json): out, OOD at {d}; else 0",
                     "unit": "0 or 1", "direction": None}
        else:
            entry = describe_column(column, score, reference)
        if column in (recommended, OUT_PREFIX + recommended):
            entry = {**entry, "meaning": f"the recommended detector (key recommended): {entry['meaning']}"}
        out[column] = entry
    return out


def describe_verdict(records: Mapping[str, list], run: FolderRun, thresholds: Mapping[str, float],
                     paths: Sequence[str | Path]) -> str:
    """The console's verdict: how many images are out at the recommended detector, the most and least OOD of
    them by its score (with their predicted classes) and where the outputs are."""
    detector, note = verdict_detector(run.recommended, thresholds)
    rows, threshold = folder_rows(records), thresholds[detector]
    out = count_out(records, rows, {detector: threshold})[detector]
    ranked = sorted(rows, key=lambda i: (-float(records[detector][i]), records[ID][i]))
    most, least = min(SHOWN, (len(rows) + 1) // 2), min(SHOWN, len(rows) // 2)
    lines = [note] if note else []
    lines.append(f"score_folder: out at {detector} (the preset's recommended detector, key recommended; threshold "
                 f"{threshold:.4g} keeps {KEEP:.0%} of InD validation): {out} of {len(rows)} images")
    for title, chosen in (("most OOD", ranked[:most]), ("least OOD", ranked[::-1][:least])):
        if chosen:
            lines.append(f"  {title}:")
            lines += [f"    {_shown_id(records[ID][i])}: predicted {class_name(records[PRED][i], run.class_names)}, "
                      f"score {float(records[detector][i]):.4g} "
                      f"({'out' if float(records[detector][i]) > threshold else 'in'})" for i in chosen]
    lines.append("  wrote " + ", ".join(map(str, paths)))
    return "\n".join(lines)


def _shown_id(sample_id: str) -> str:
    return sample_id[len(FOLDER) + 1:] if sample_id.startswith(FOLDER + "/") else sample_id
