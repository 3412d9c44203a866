"""Histograms of each detector's scores: InD test against each OOD test set, titled with what the score measures."""

from __future__ import annotations

import textwrap
from typing import Dict, List, Mapping

import lightning as L

from diffguard_pl.callbacks._common import ordered_sets, output_folder, save_figure, set_styles
from diffguard_pl.data.benchmark import IND


def histogram_figure(by_set: Mapping[str, List[float]], detector: str, described: dict, groups: Mapping[str, str],
                     split: str = "test", bins: int = 40):
    """Densities of one detector's scores per set on shared bins: InD filled grey under a black outline, each
    OOD set an outline in its colour (near-OOD dashed). ``described`` is the column's entry of scores.csv's
    dictionary (:func:`~diffguard_pl.detectors.results.describe_column`): the title says what the score
    measures, the x axis its unit and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [v for values in by_set.values() for v in values]
    lo, hi = min(every), max(every)
    span = max(hi - lo, 1e-6 * max(1.0, abs(hi)))  # near-constant scores still get finite bins
    edges = [lo + span * k / bins for k in range(bins + 1)]
    sets = ordered_sets(by_set, groups)
    styles = set_styles(sets, groups)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for set_name in sets:
        style = styles[set_name]
        if set_name == IND:  # filled, so every OOD outline stays visible over it
            ax.hist(by_set[set_name], bins=edges, density=True, histtype="stepfilled", facecolor="0.8",
                    edgecolor="black", linewidth=style["linewidth"], label=style["label"], zorder=1)
        else:
            ax.hist(by_set[set_name], bins=edges, density=True, histtype="step", **style)
    unit = f"{described['unit']}; " if described.get("unit") else ""
    ax.set_xlabel(f"{detector} score ({unit}higher = more OOD)")
    ax.set_ylabel("density (each set integrates to 1)")
    meaning = described.get("meaning") or detector
    ax.set_title("\n".join([f"{detector} ({split} split)"] + textwrap.wrap(meaning, 90)), fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


class ScoreDistributionPlot(L.Callback):
    """Draws ``scores/<detector>.png`` (:func:`histogram_figure`) of DiffGuard's detectors and its fusion partners
    from the evaluator's gathered records and, with
    W&B, logs them under ``scores/<detector>`` (rank 0 only)."""

    def __init__(self, bins: int = 40) -> None:
        self.bins = bins

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the evaluator's own on_test_epoch_end has gathered the records.
        records = getattr(pl_module, "all_records", None)
        if not trainer.is_global_zero or not records:
            return
        from diffguard_pl.detectors.fused import detector_columns
        from diffguard_pl.detectors.results import describe_column

        split = getattr(pl_module, "split", "test")
        groups = dict(getattr(pl_module, "groups", {}))
        cfg = getattr(getattr(pl_module, "pipeline", None), "cfg", None)
        score, reference = getattr(cfg, "score", None), getattr(cfg, "reference", None)
        folder = output_folder(trainer, "scores")
        sets = list(dict.fromkeys(s for s, sp in zip(records["set"], records["split"]) if sp == split))
        columns = detector_columns(records)
        partners = {c.split("+", 1)[1] for c in columns if c.startswith("diffguard+")}
        # DiffGuard's columns (its distances, fused, oracles) and its fusion partners alone; not every baseline
        for detector in [c for c in columns if "diffguard" in c or c in partners]:
            by_set: Dict[str, List[float]] = {
                s: [v for v, name, sp in zip(records[detector], records["set"], records["split"])
                    if name == s and sp == split] for s in sets}
            by_set = {s: values for s, values in by_set.items() if values}
            if not by_set:
                continue
            fig = histogram_figure(by_set, detector, describe_column(detector, score, reference), groups, split,
                                   self.bins)
            name = detector.replace("/", "_")
            save_figure(fig, folder / f"{name}.png", trainer, f"scores/{name}")
