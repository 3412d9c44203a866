"""Histograms of each detector's scores: InD test against each OOD test set, titled with what the score measures."""

from __future__ import annotations

import textwrap
from typing import Dict, List, Mapping

import lightning as L

from diffguard_pl.callbacks._common import ordered_sets, output_folder, save_figure, set_styles
from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.registry import is_diffusion_detector
from diffguard_pl.records.columns import (DIFFGUARD, SET, SPLIT, describe_column, detector_columns, fused_partner,
                                          fusion_parts)


def histogram_figure(by_set: Mapping[str, List[float]], detector: str, described: dict, groups: Mapping[str, str],
                     split: str = "test", bins: int = 40):
    """Densities of one detector's scores per set on shared bins: InD filled grey under a black outline, each
    OOD set an outline in its colour (near-OOD dashed). ``described`` is the column's entry of scores.csv's
    dictionary (:func:`~diffguard_pl.records.columns.describe_column`): the title says what the score
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
    from an evaluation's records (the report calls :meth:`on_report` once with every record and the derived
    detectors) and, with W&B, logs them under ``scores/<detector>``."""

    def __init__(self, bins: int = 40) -> None:
        self.bins = bins

    def on_report(self, records: Mapping[str, list], header: Mapping, output_dir, run=None) -> None:
        split, groups = header.get("split", "test"), dict(header.get("groups", {}))
        reference = header.get("config", {}).get("diffguard", {}).get("reference")
        folder = output_folder(output_dir, "scores")
        in_split = [i for i, sp in enumerate(records[SPLIT]) if sp == split]
        sets = list(dict.fromkeys(records[SET][i] for i in in_split))
        columns = detector_columns(records)
        partners = {p for c in columns if fused_partner(c) for p in fusion_parts(fused_partner(c)) or [fused_partner(c)]}
        # DiffGuard's columns (its distances, fused, oracles), the diffusion detectors and the fusion partners alone;
        # not every classifier detector
        for detector in [c for c in columns if DIFFGUARD in c or c in partners or is_diffusion_detector(c)]:
            by_set: Dict[str, List[float]] = {
                s: [records[detector][i] for i in in_split if records[SET][i] == s] for s in sets}
            by_set = {s: values for s, values in by_set.items() if values}
            if not by_set:
                continue
            fig = histogram_figure(by_set, detector, describe_column(detector, header.get("score"), reference), groups,
                                   split, self.bins)
            name = detector.replace("/", "_")
            save_figure(fig, folder / f"{name}.png", run, f"scores/{name}")
