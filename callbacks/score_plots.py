"""Histograms of each detector's scores: InD test against each OOD test set, titled with what the score measures;
for a scored folder (``score_folder``), the folder's scores against InD validation with each detector's threshold."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import lightning as L

from diffguard_pl.callbacks._common import ordered_sets, output_folder, save_figure, set_styles
from diffguard_pl.data.benchmark import IND
from diffguard_pl.detectors.registry import is_diffusion_detector
from diffguard_pl.records.columns import (DIFFGUARD, SET, SPLIT, describe_column, detector_columns, fused_partner,
                                          fusion_parts)


FOLDER_VIEW = "folder_view"  # the key of a folder run's header (as the report passes it) that holds what to draw


def plot_path(output_dir, detector: str) -> Path:
    """Where :class:`ScoreDistributionPlot` draws ``detector``'s histogram."""
    return Path(output_dir) / "scores" / f"{detector.replace('/', '_')}.png"


def histogram_figure(by_set: Mapping[str, List[float]], detector: str, described: dict, groups: Mapping[str, str],
                     split: str = "test", bins: int = 40, threshold: Optional[float] = None,
                     title: Optional[str] = None, labels: Optional[Mapping[str, str]] = None):
    """Densities of one detector's scores per set on shared bins: InD filled grey under a black outline, each
    OOD set an outline in its colour (near-OOD dashed). ``described`` is the column's entry of scores.csv's
    dictionary (:func:`~diffguard_pl.records.columns.describe_column`): the title says what the score
    measures, the x axis its unit and direction. ``threshold``: drawn as a vertical line (a scored folder's
    decision: out above it); ``title``: the first title line instead of ``<detector> (<split> split)``;
    ``labels``: legend labels instead of the sets' own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [v for values in by_set.values() for v in values] + ([threshold] if threshold is not None else [])
    lo, hi = min(every), max(every)
    span = max(hi - lo, 1e-6 * max(1.0, abs(hi)))  # near-constant scores still get finite bins
    edges = [lo + span * k / bins for k in range(bins + 1)]
    sets = ordered_sets(by_set, groups)
    styles = set_styles(sets, groups)
    for set_name, label in (labels or {}).items():
        styles[set_name]["label"] = label
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for set_name in sets:
        style = styles[set_name]
        if set_name == IND:  # filled, so every OOD outline stays visible over it
            ax.hist(by_set[set_name], bins=edges, density=True, histtype="stepfilled", facecolor="0.8",
                    edgecolor="black", linewidth=style["linewidth"], label=style["label"], zorder=1)
        else:
            ax.hist(by_set[set_name], bins=edges, density=True, histtype="step", **style)
    if threshold is not None:
        ax.axvline(threshold, color="C3", linestyle=":", linewidth=1.8, zorder=4,
                   label=f"threshold {threshold:.4g} (out above)")
    unit = f"{described['unit']}; " if described.get("unit") else ""
    ax.set_xlabel(f"{detector} score ({unit}higher = more OOD)")
    ax.set_ylabel("density (each set integrates to 1)")
    meaning = described.get("meaning") or detector
    ax.set_title("\n".join([title or f"{detector} ({split} split)"] + textwrap.wrap(meaning, 90)), fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def plotted_detectors(columns: Sequence[str]) -> List[str]:
    """DiffGuard's columns (its distances, fused, oracles), the diffusion detectors and the fusion partners alone;
    not every classifier detector."""
    partners = {p for c in columns if fused_partner(c) for p in fusion_parts(fused_partner(c)) or [fused_partner(c)]}
    return [c for c in columns if DIFFGUARD in c or c in partners or is_diffusion_detector(c)]


class ScoreDistributionPlot(L.Callback):
    """Draws ``scores/<detector>.png`` (:func:`histogram_figure`) of DiffGuard's detectors and its fusion partners
    from an evaluation's records (the report calls :meth:`on_report` once with every record and the derived
    detectors) and, with W&B, logs them under ``scores/<detector>``. A folder run's header carries
    :data:`FOLDER_VIEW` (``set``: the folder's set, ``label``: its legend label, ``thresholds`` per detector,
    ``first``: the detectors drawn first, e.g. the recommended one): then each histogram is the folder's scores
    against InD validation with the detector's threshold."""

    def __init__(self, bins: int = 40) -> None:
        self.bins = bins

    def on_report(self, records: Mapping[str, list], header: Mapping, output_dir, run=None) -> None:
        split, groups = header.get("split", "test"), dict(header.get("groups", {}))
        reference = header.get("config", {}).get("diffguard", {}).get("reference")
        output_folder(output_dir, "scores")
        view = header.get(FOLDER_VIEW)
        if view is not None:  # a scored folder: InD validation (the thresholds' source) against the folder
            rows = {IND: [i for i, (s, sp) in enumerate(zip(records[SET], records[SPLIT])) if s == IND and sp == "val"],
                    view["set"]: [i for i, s in enumerate(records[SET]) if s == view["set"]]}
            detectors = [d for d in dict.fromkeys([*view["first"], *plotted_detectors(detector_columns(records))])
                         if d in view["thresholds"]]
        else:
            in_split = [i for i, sp in enumerate(records[SPLIT]) if sp == split]
            rows = {s: [i for i in in_split if records[SET][i] == s]
                    for s in dict.fromkeys(records[SET][i] for i in in_split)}
            detectors = plotted_detectors(detector_columns(records))
        for detector in detectors:
            by_set = {s: [records[detector][i] for i in indices] for s, indices in rows.items() if indices}
            if not by_set:
                continue
            described = describe_column(detector, header.get("score"), reference)
            if view is not None:
                counts = {s: len(v) for s, v in by_set.items()}
                title = (f"{detector}: {view['label']}, {counts.get(view['set'], 0)} images, against InD validation "
                         f"({counts.get(IND, 0)})")
                fig = histogram_figure(by_set, detector, described, {}, bins=self.bins, title=title,
                                       threshold=view["thresholds"][detector],
                                       labels={IND: "InD validation", view["set"]: view["label"]})
            else:
                fig = histogram_figure(by_set, detector, described, groups, split, self.bins)
            path = plot_path(output_dir, detector)
            save_figure(fig, path, run, f"scores/{path.stem}")
