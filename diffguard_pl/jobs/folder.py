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
from diffguard_pl.records.columns import detector_columns

KEEP = 0.95
FOLDER = "folder"
MIN_VALIDATION = 20  # InD validation samples the 95% threshold needs at the least
MAX_NAMED = 10  # skipped files named on the console (results.json names them all)


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
    val = [i for i, (s, sp) in enumerate(zip(records["set"], records["split"])) if s == IND and sp == "val"]
    if len(val) < MIN_VALIDATION:
        raise ValueError(f"{len(val)} InD validation samples are too few to set a {keep:.0%} threshold "
                         f"(need {MIN_VALIDATION}+)")
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
