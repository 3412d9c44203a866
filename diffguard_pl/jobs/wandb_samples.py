"""A W&B table of the samples the reconstruction grids show: one row per sample, with its images, classes, scores
and in / out decisions. W&B only; the grids themselves stay PNG files (callbacks/reconstructions.py).

``reconstructions/samples`` has the columns ``id``, ``set``, ``image`` (the input), ``synthesis`` (the guided
synthesis), ``reconstruction`` (the unguided reconstruction, only with ``diffguard.reference=unguided``),
``class_name`` (the classifier's prediction, which guides the synthesis), ``label_name`` (the true class of an
InD sample, empty for OOD), then DiffGuard's score (``diffguard``), each fusion with DiffGuard the records
hold (``diffguard+X``: fusion_partners) and the ``recommended`` detector (score_folder's verdict), and for each of
these ``in_out/<detector>``: ``in`` when the score is
at most the threshold that keeps 95% of the InD validation samples the run scored (diffguard_pl/jobs/folder.py,
the thresholds score_folder applies), else ``out``. The thresholds need 20 InD validation samples or more; with
fewer (a small ``limit_per_set``) the in / out columns are left out. ``reconstructions/samples_columns`` says
what each column holds, the thresholds included, or why the in / out columns are missing.

The scores come from the finished records with the derived detectors (the report's), so the table is drawn by
a report listener (:class:`SampleTable`), after the test loop's callback kept the samples it drew.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from diffguard_pl.callbacks._common import ordered_sets
from diffguard_pl.callbacks.reconstructions import class_name
from diffguard_pl.records.columns import DIFFGUARD, ID, describe_column, detector_columns, fusion_parts

IN_OUT = "in_out/"


def score_columns(records: Mapping[str, list], recommended: Optional[str] = None) -> List[str]:
    """DiffGuard's score, every fusion with DiffGuard among the records' detectors, and ``recommended``."""
    columns = [c for c in detector_columns(records) if c == DIFFGUARD or DIFFGUARD in (fusion_parts(c) or [])]
    return columns + ([recommended] if recommended in records and recommended not in columns else [])


def decision_thresholds(records: Mapping[str, list], columns: Sequence[str]) -> Tuple[Optional[Dict[str, float]], str]:
    """(column -> threshold keeping 95% of InD validation, or None, and what the in / out columns mean or why
    they are missing)."""
    from diffguard_pl.jobs.folder import KEEP, thresholds_from

    try:
        thresholds = thresholds_from(records)
    except ValueError as error:
        return None, f"in / out left out: {error}; raise limit_per_set to 20 or more"
    return ({c: thresholds[c] for c in columns},
            f"in when the score is at most the threshold that keeps {KEEP:.0%} of the InD validation samples "
            f"this run scored, out above it")


def sample_rows(shown: Mapping[str, List[dict]], records: Mapping[str, list], header: Mapping,
                class_names: Optional[Sequence[str]] = None,
                recommended: Optional[str] = None) -> Tuple[List[str], List[list], Dict[str, str]]:
    """(columns, rows, column -> meaning) of the table (module docstring); the image cells hold the CHW tensors
    in [0, 1] the grids drew. ``shown``: set -> the grid's samples (ReconstructionLogger.shown); ``recommended``:
    the config's recommended detector."""
    unguided = header.get("config", {}).get("diffguard", {}).get("reference", "input") == "unguided"
    scores = score_columns(records, recommended)
    thresholds, decision = decision_thresholds(records, scores)
    position = {sample_id: i for i, sample_id in enumerate(records[ID])}
    meaning = {"id": "the sample's stable id", "set": "ind or the OOD set's name", "image": "the input",
               "synthesis": "the guided synthesis"}
    if unguided:
        meaning["reconstruction"] = "the unguided reconstruction (diffguard.reference=unguided)"
    meaning.update({"class_name": "the classifier's prediction on the input, which guides the synthesis",
                    "label_name": "the true class of an InD sample; empty for OOD"})
    for column in scores:
        described = describe_column(column, header.get("score"), header.get("config", {}).get("diffguard", {})
                                    .get("reference"))
        meaning[column] = f"{described['meaning']} ({described['unit']}; {described['direction']})"
        if column == recommended:
            meaning[column] += "; the recommended detector (recommended=, score_folder's verdict)"
    if thresholds is not None:
        meaning.update({f"{IN_OUT}{c}": f"{decision}: {thresholds[c]:.6g}" for c in scores})
    rows = []
    for set_name in ordered_sets(shown, header.get("groups", {})):
        for sample in shown[set_name]:
            i = position[sample["id"]]
            row = [sample["id"], set_name, sample["input"], sample["synthesis"]]
            row += [sample["reference"]] if unguided else []
            row += [class_name(sample["pred"], class_names),
                    class_name(sample["label"], class_names) if sample["label"] >= 0 else ""]
            values = [float(records[c][i]) for c in scores]
            row += values
            if thresholds is not None:
                row += ["in" if v <= thresholds[c] else "out" for v, c in zip(values, scores)]
            rows.append(row)
    columns = list(meaning)
    if thresholds is None:
        meaning["in_out"] = decision
    return columns, rows, meaning


def to_image(tensor):
    """A CHW tensor in [0, 1] as a ``wandb.Image`` (8-bit, grey for one channel)."""
    import wandb

    pixels = (tensor.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return wandb.Image(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


class SampleTable:
    """Report listener: with W&B, logs ``reconstructions/samples`` and ``reconstructions/samples_columns`` for
    the samples ``source`` (a ReconstructionLogger) drew (module docstring); nothing without W&B."""

    def __init__(self, source, recommended: Optional[str] = None) -> None:
        self.source, self.recommended = source, recommended

    def on_report(self, records: Mapping[str, list], header: Mapping, output_dir, run=None) -> None:
        if run is None or not self.source.shown:
            return
        import torch
        import wandb

        columns, rows, meaning = sample_rows(self.source.shown, records, header, self.source.class_names,
                                            self.recommended)
        cells = [[to_image(v) if isinstance(v, torch.Tensor) else v for v in row] for row in rows]
        run.log({"reconstructions/samples": wandb.Table(columns=columns, data=cells),
                 "reconstructions/samples_columns": wandb.Table(columns=["column", "meaning"],
                                                                data=[[k, v] for k, v in meaning.items()])})


def sample_tables(trainer, recommended: Optional[str] = None) -> list:
    """A :class:`SampleTable` for each reconstruction callback of the evaluation's trainer."""
    from diffguard_pl.callbacks import ReconstructionLogger

    return [SampleTable(c, recommended) for c in trainer.callbacks if isinstance(c, ReconstructionLogger)]
