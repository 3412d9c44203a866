"""The report: from an evaluation's finished records to every output, one way for every kind of run.

:func:`report` is the one path from records to outputs: a fresh run, a resumed run with nothing left to do and
a merge of shards all call it with the records (diffguard_pl/records/store.py) and their header. It adds the
derived detectors once (``diffguard``, ``diffguard+X``: diffguard_pl/detectors/fused.py), computes every metric
(diffguard_pl/detectors/results.py) and writes ``results.json`` (every detector's metrics with intervals,
comparisons, InD accuracy, the classifier detectors' choice, the oracle's description, throughput),
``scores.csv`` with ``columns.json`` (one row per sample; what each column means, from
diffguard_pl/records/columns.py), with ``score_folder`` the folder's scores and decisions, the figures of the
record-drawing callbacks (score histograms, inversion curves) and, with W&B, the run's summary; then it prints
the table. The classifier detectors' choice is saved beside the records by the run that fitted them
(``baselines.json``, under the run's fingerprint), so a resumed run that fits nothing and a merge of several
folders report it too.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from diffguard_pl.detectors.fused import with_derived_detectors
from diffguard_pl.detectors.results import format_table, summarize
from diffguard_pl.records.columns import UNET_EVALS, column_dictionary, is_list_column

BASELINE_CHOICE = "baselines.json"
DIFFUSION_CHOICE = "diffusion_detectors.json"  # the diffusion detectors' params, costs and fitted heads
CLASSIFIER_CHECK = "classifier_check.json"  # the classifier's InD validation accuracy against its record


def save_baseline_choice(output_dir: Path, fingerprint: str, choice: dict, name: str = BASELINE_CHOICE) -> None:
    (Path(output_dir) / name).write_text(json.dumps({"fingerprint": fingerprint, "baselines": choice}, indent=2,
                                                    default=str))


def load_baseline_choice(folders: Sequence[Path], fingerprint: str, name: str = BASELINE_CHOICE) -> Optional[dict]:
    """The choice saved under ``fingerprint`` in the first of ``folders`` that has one (``name``: the classifier
    detectors' or the diffusion detectors' file)."""
    for folder in folders:
        try:
            saved = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            return saved.get("baselines")
    return None


THROUGHPUT = ("images_per_second: the images DiffGuard evaluated in this run (every process) per second of its test "
              "loop, from the first batch's start to the last batch's end (set-up, baseline fitting and metrics "
              "excluded); wall_seconds: the whole run, from start to finish")


def throughput(records: Mapping[str, list], images: int, loop_seconds: float, wall_seconds: Optional[float],
               machine: Optional[dict] = None) -> dict:
    """results.json's ``throughput``: one definition of images/s (:data:`THROUGHPUT`), the same on the console."""
    evals = records.get(UNET_EVALS) or []
    out = {"definition": THROUGHPUT, "images": images, "loop_seconds": loop_seconds,
           "images_per_second": images / loop_seconds if images and loop_seconds > 0 else None,
           "wall_seconds": wall_seconds, "unet_evals_per_image": sum(evals) / max(len(evals), 1)}
    if machine is not None:
        out["machine"] = machine
    return out


def diffusion_cost(choice: Mapping[str, dict]) -> int:
    """The diffusion detectors' UNet evaluations per image beside DiffGuard's (results.json's
    ``diffusion_detectors``), statistics shared by several detectors counted once."""
    return sum(entry["unet_evals_per_image"] for entry in choice.values() if "shares_statistics_with" not in entry)


def results_of(records: Mapping[str, list], header: dict, folders: Sequence[Path]) -> tuple[dict, Dict[str, list]]:
    """(results.json's content without throughput, the records with the derived detectors) from every finished
    record and the records' header."""
    records, notes = with_derived_detectors(records, header["score"], header["partners"])
    results = summarize(records, header["groups"], header["split"])
    if notes:
        results["notes"] = notes
    choice = load_baseline_choice(folders, header["fingerprint"])
    if choice is not None:
        results["baselines"] = choice
    diffusion = load_baseline_choice(folders, header["fingerprint"], DIFFUSION_CHOICE)
    if diffusion is not None:
        results["diffusion_detectors"] = diffusion
    check = load_baseline_choice(folders, header["fingerprint"], CLASSIFIER_CHECK)
    if check is not None:
        results["classifier_check"] = check
    oracle = header.get("config", {}).get("oracle", "none")
    if oracle != "none":
        from diffguard_pl.method.oracle import describe

        results["oracle"] = describe(oracle)
    return results, records


def report(records: Mapping[str, list], header: dict, output_dir: Path, timing: dict, *,
           folders: Sequence[Path] = (), listeners: Sequence = (), logger=None, folder=None,
           data_report: Optional[dict] = None, classifier_check: Optional[dict] = None) -> dict:
    """Every output of an evaluation from its records (see the module docstring); returns results.json's content.

    ``timing``: :func:`throughput`'s arguments but the records (``images``, ``loop_seconds``, ``wall_seconds``,
    ``machine``); ``folders``: where the classifier detectors' choice may be saved (``output_dir`` and, for a
    merge, the shards); ``listeners``: callbacks with ``on_report(records, header, output_dir, run)``;
    ``logger``: the run's Lightning logger (W&B or CSV), None for none; ``folder``: a scored folder's
    :class:`~diffguard_pl.jobs.folder.FolderRun` (then results.json is :func:`~diffguard_pl.jobs.folder.folder_results`,
    and the verdict ends the console); ``data_report``: a file benchmark's report (results.json's ``data``);
    ``classifier_check``: the classifier's InD validation accuracy against its record
    (diffguard_pl/detectors/classifier_check.py), saved beside the records (a merge of shards reports it too).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if classifier_check is not None:
        save_baseline_choice(output_dir, header["fingerprint"], classifier_check, CLASSIFIER_CHECK)
    results, records = results_of(records, header, [output_dir, *folders])
    results["throughput"] = throughput(records, **timing)
    if results.get("diffusion_detectors"):
        results["throughput"]["diffusion_detectors_unet_evals_per_image"] = diffusion_cost(results["diffusion_detectors"])
    if data_report is not None:
        results["data"] = data_report
    written = results
    if folder is not None:  # what exists without labelled OOD sets; the histograms against the thresholds
        from diffguard_pl.callbacks.score_plots import FOLDER_VIEW
        from diffguard_pl.jobs.folder import folder_results, folder_view, thresholds_from

        thresholds = thresholds_from(records)
        written = folder_results(records, results, folder, thresholds)
        header = {**header, FOLDER_VIEW: folder_view(records, folder, thresholds)}
    write_json(written, output_dir / "results.json")
    reference = header.get("config", {}).get("diffguard", {}).get("reference", "input")
    write_scores_csv(records, output_dir / "scores.csv", header["score"], reference)
    run = wandb_run(logger)
    for listener in listeners:
        listener.on_report(records, header, output_dir, run)
    if logger is not None:
        log_results(logger, results, output_dir)
    if folder is not None:
        _say_verdict(records, header, output_dir, folder, thresholds)
        return written
    print(format_table(results, header["groups"]))
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'scores.csv'}")
    return results


def _say_verdict(records: Mapping[str, list], header: dict, output_dir: Path, folder,
                 thresholds: Mapping[str, float]) -> None:
    """The folder's CSV and column dictionary, then the verdict with every output's path (the histograms that
    were drawn: the verdict's detector's and DiffGuard's)."""
    from diffguard_pl.callbacks.score_plots import plot_path
    from diffguard_pl.jobs.folder import describe_verdict, folder_view, write_folder_scores

    reference = header.get("config", {}).get("diffguard", {}).get("reference")
    paths = [write_folder_scores(records, output_dir, folder, thresholds, header["score"], reference),
             output_dir / "folder_columns.json",
             output_dir / "thresholds.json", output_dir / "results.json"]
    drawn = [plot_path(output_dir, d) for d in dict.fromkeys(folder_view(records, folder, thresholds)["first"])]
    paths += [f"histogram {p}" for p in drawn if p.is_file()]
    print(describe_verdict(records, folder, thresholds, paths))


def write_scores_csv(records: Mapping[str, list], path: str | Path, score: Optional[str] = None,
                     reference: Optional[str] = None) -> None:
    """One row per sample: the meta columns and every detector's score (the per-step curves stay in records/);
    beside it ``columns.json``, what each column means (diffguard_pl/records/columns.py)."""
    columns = [c for c in records if not is_list_column(c)]
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


def wandb_run(logger):
    """The W&B run behind a Lightning logger, None for any other logger (or none)."""
    return logger.experiment if type(logger).__name__ == "WandbLogger" else None


def log_results(logger, results: dict, output_dir: Path) -> None:
    """The results to the logger (diffguard_pl/jobs/wandb_report.py); with W&B also the output files as an
    artifact."""
    from diffguard_pl.jobs.wandb_report import log_results as log_to

    log_to(logger, results)
    logger.save()
    run = wandb_run(logger)
    if run is not None:
        import wandb

        artifact = wandb.Artifact(f"evaluation-{run.id}", type="evaluation")
        for name in ("results.json", "scores.csv", "columns.json", "config.yaml"):
            if (output_dir / name).is_file():
                artifact.add_file(str(output_dir / name))
        run.log_artifact(artifact)
