"""From finished records to an evaluation's outputs: what an evaluation run and a merge of shards share.

``results.json`` (every detector's metrics with intervals, comparisons, InD accuracy, the baselines' choice, the
oracle's description, throughput), ``scores.csv`` (one row per sample), the table on the console, and with
``score_folder`` the folder's scores and decisions. The baselines' choice is saved beside the records by the
run that fitted them (``baselines.json``, under the run's fingerprint), so a resumed run that fits nothing and a
merge of several folders report it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from diffguard_pl.detectors.results import finalize, format_table, write_json, write_scores_csv

BASELINE_CHOICE = "baselines.json"


def save_baseline_choice(output_dir: Path, fingerprint: str, choice: dict) -> None:
    (Path(output_dir) / BASELINE_CHOICE).write_text(
        json.dumps({"fingerprint": fingerprint, "baselines": choice}, indent=2))


def load_baseline_choice(folders: Sequence[Path], fingerprint: str) -> Optional[dict]:
    """The baselines' choice saved under ``fingerprint`` in the first of ``folders`` that has one."""
    for folder in folders:
        try:
            saved = json.loads((Path(folder) / BASELINE_CHOICE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            return saved.get("baselines")
    return None


def results_of(records: Dict[str, list], header: dict, folders: Sequence[Path]) -> dict:
    """results.json's content (without throughput) from every finished record and the records' header."""
    results = finalize(records, header["score"], header["groups"], header["split"], header["partners"])
    choice = load_baseline_choice(folders, header["fingerprint"])
    if choice is not None:
        results["baselines"] = choice
    oracle = header.get("config", {}).get("oracle", "none")
    if oracle != "none":
        from diffguard_pl.method.oracle import describe

        results["oracle"] = describe(oracle)
    return results


THROUGHPUT = ("images_per_second: the images DiffGuard evaluated in this run (every process) per second of its test "
              "loop, from the first batch's start to the last batch's end (set-up, baseline fitting and metrics "
              "excluded); wall_seconds: the whole run, from start to finish")


def throughput(records: Dict[str, list], images: int, loop_seconds: float, wall_seconds: Optional[float],
               machine: Optional[dict] = None) -> dict:
    """results.json's ``throughput``: one definition of images/s (:data:`THROUGHPUT`), the same on the console."""
    evals = records.get("unet_evals") or []
    out = {"definition": THROUGHPUT, "images": images, "loop_seconds": loop_seconds,
           "images_per_second": images / loop_seconds if images and loop_seconds > 0 else None,
           "wall_seconds": wall_seconds, "unet_evals_per_image": sum(evals) / max(len(evals), 1)}
    if machine is not None:
        out["machine"] = machine
    return out


def write_outputs(results: dict, records: Dict[str, list], header: dict, output_dir: Path,
                  folder_report: Optional[dict] = None, data_report: Optional[dict] = None) -> None:
    """results.json and scores.csv (or, scoring a folder, its scores and decisions too), then the table.
    ``data_report``: the images a file benchmark skipped or converted (results.json's ``data``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if folder_report is not None:
        results["folder"] = folder_report
    if data_report is not None:
        results["data"] = data_report
    write_json(results, output_dir / "results.json")
    reference = header.get("config", {}).get("diffguard", {}).get("reference", "input")
    write_scores_csv(records, output_dir / "scores.csv", header["score"], reference)
    if folder_report is not None:
        from diffguard_pl.jobs.folder import write_folder_scores

        write_folder_scores(records, output_dir)
        return
    print(format_table(results, header["groups"]))
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'scores.csv'}")
