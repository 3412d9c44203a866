"""Per-step inversion quality curves (PSNR in dB, SSIM, 1 - DISTS of x_t against x0), per data set, for tuning
adaptive early stop (AES): where InD and each OOD set cross the threshold."""

from __future__ import annotations

import csv
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import lightning as L
import torch

from diffguard_pl.callbacks._common import ordered_sets, output_folder, save_figure, set_label, set_styles
from diffguard_pl.data.benchmark import IND
from diffguard_pl.records.columns import SET, curve_column, curve_metric

QUANTILES = (0.1, 0.5, 0.9)
BANDS = ("q10", "q50", "q90")
# What each curve measures and its unit (diffguard_pl/method/aes.py); AES stops a sample once it falls below.
METRICS = {"psnr": ("PSNR of x_t against x0", "dB"), "ssim": ("SSIM of x_t against x0", None),
           "dists": ("1 - DISTS of x_t against x0", None)}


def axis_label(metric: str) -> str:
    """``PSNR of x_t against x0 (dB)``: the metric with its unit."""
    name, unit = METRICS.get(metric, (metric, None))
    return f"{name} ({unit})" if unit else name


def aes_thresholds(aes) -> Dict[str, float]:
    """The AES thresholds in force per curve metric (``diffguard.aes``, the config object or its dict in a
    records header; {} when AES is off or unknown)."""
    if aes is None:
        return {}
    get = aes.get if isinstance(aes, Mapping) else lambda key: getattr(aes, key, None)
    if not get("enabled"):
        return {}
    return {m: float(get(m)) for m in METRICS if get(m) is not None}


def summarize_curves(curves: Dict[str, Dict[str, torch.Tensor]]) -> List[dict]:
    """Rows (set, metric, step, count, mean, q10, q50, q90) from per-sample curves [N, steps] (NaN = stopped)."""
    rows = []
    for set_name, by_metric in curves.items():
        for metric, values in by_metric.items():
            for step in range(values.shape[1]):
                column = values[:, step]
                column = column[torch.isfinite(column)].double()
                if len(column) == 0:
                    continue
                q = torch.quantile(column, torch.tensor(QUANTILES, dtype=torch.float64))
                rows.append({"set": set_name, "metric": metric, "step": step + 1, "count": len(column),
                             "mean": float(column.mean()), **{f"q{int(p * 100)}": float(v) for p, v in zip(QUANTILES, q)}})
    return rows


def curves_from_records(records: Dict[str, list]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per set and metric, the samples' curves [N, longest] (NaN past a sample's own depth)."""
    per_set: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    metrics = [curve_metric(c) for c in records if curve_metric(c)]
    for i, set_name in enumerate(records[SET]):
        for metric in metrics:
            values = records[curve_column(metric)][i]
            if values:
                per_set[set_name][metric].append(values)
    out = {}
    for set_name, by_metric in per_set.items():
        out[set_name] = {}
        for metric, rows in by_metric.items():
            width = max(len(r) for r in rows)
            out[set_name][metric] = torch.tensor([r + [float("nan")] * (width - len(r)) for r in rows],
                                                 dtype=torch.float64)
    return out


def band_series(rows: Sequence[dict], metric: str, sets: Sequence[str], groups: Mapping[str, str],
                threshold: Optional[float] = None, ood_bands: Sequence[str] = BANDS
                ) -> Tuple[List[List[int]], List[List[float]], List[str]]:
    """W&B line-series data of one metric: per set its quantile lines (keys ``InD q50``, ``faces (far-OOD) q10``,
    ...; InD all of 10 / 50 / 90%, the other sets ``ood_bands``) over the steps it has samples at, and the AES
    threshold as a constant line ``AES threshold``."""
    xs, ys, keys = [], [], []
    for set_name in sets:
        mine = [r for r in rows if r["metric"] == metric and r["set"] == set_name]
        for band in BANDS if set_name == IND else ood_bands:
            xs.append([r["step"] for r in mine])
            ys.append([r[band] for r in mine])
            keys.append(f"{set_label(set_name, groups)} {band}")
    if threshold is not None:
        steps = sorted({r["step"] for r in rows if r["metric"] == metric})
        xs.append(steps)
        ys.append([threshold] * len(steps))
        keys.append("AES threshold")
    return xs, ys, keys


def curve_figure(rows: Sequence[dict], metric: str, groups: Mapping[str, str], threshold: Optional[float] = None):
    """One metric's curves: per set the median over samples and its 10-90% band, InD black and thick over a
    grey band, near-OOD sets dashed; the AES threshold as a red dotted line (a sample stops below it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sets = ordered_sets((r["set"] for r in rows if r["metric"] == metric), groups)
    styles = set_styles(sets, groups)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for set_name in sets:
        mine = [r for r in rows if r["metric"] == metric and r["set"] == set_name]
        steps = [r["step"] for r in mine]
        style, ind = styles[set_name], set_name == IND
        ax.plot(steps, [r["q50"] for r in mine], **style)
        ax.fill_between(steps, [r["q10"] for r in mine], [r["q90"] for r in mine], linewidth=0,
                        color="0.6" if ind else style["color"], alpha=0.35 if ind else 0.12,
                        zorder=style["zorder"] - 1)
    if threshold is not None:
        unit = METRICS.get(metric, (metric, None))[1]
        ax.axhline(threshold, color="red", linestyle=":", linewidth=1.6, zorder=4,
                   label=f"AES threshold {threshold:g}{' ' + unit if unit else ''} (stop below)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("inversion step")
    ax.set_ylabel(axis_label(metric))
    ax.set_title(f"{METRICS.get(metric, (metric,))[0]}: median over samples, 10-90% band", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return fig


class InversionCurveLogger(L.Callback):
    """Draws each set's per-step inversion quality from an evaluation's records, for tuning AES.

    The report (diffguard_pl/jobs/report.py) calls :meth:`on_report` once with every record (``curve/<metric>``
    columns), so a resumed run's plots and a merge's cover every sample; the AES thresholds come from the
    records' config. Writes ``curves/curves.csv`` (mean and quantiles per set, metric and step) and
    ``curves/<metric>.png`` (:func:`curve_figure`); with W&B also the table ``curves/quantiles`` (the CSV's rows),
    per metric a line plot ``curves/<metric>`` (every set's median, InD's 10 / 50 / 90% lines, the threshold) and
    per OOD set ``curves/<metric>/<set>`` (that set's and InD's 10 / 50 / 90% lines, the threshold), and the PNGs.
    """

    def on_report(self, records: Mapping[str, list], header: Mapping, output_dir, run=None) -> None:
        curves = curves_from_records(records)
        if not curves:
            return
        rows = summarize_curves(curves)
        folder = output_folder(output_dir, "curves")
        with open(folder / "curves.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        groups = dict(header.get("groups", {}))
        thresholds = aes_thresholds(header.get("config", {}).get("diffguard", {}).get("aes"))
        if run is not None:
            self._log_wandb(run, rows, groups, thresholds)
        for metric in dict.fromkeys(r["metric"] for r in rows):
            fig = curve_figure(rows, metric, groups, thresholds.get(metric))
            save_figure(fig, folder / f"{metric}.png", run, f"curves/{metric}_png")

    @staticmethod
    def _log_wandb(run, rows: List[dict], groups: Dict[str, str], thresholds: Dict[str, float]) -> None:
        import wandb

        columns = ["set", "group"] + [c for c in rows[0] if c != "set"]
        table = wandb.Table(columns=columns, data=[
            [r["set"], "InD" if r["set"] == IND else groups.get(r["set"], "")] + [r[c] for c in columns[2:]]
            for r in rows])
        logged = {"curves/quantiles": table}
        for metric in dict.fromkeys(r["metric"] for r in rows):
            sets = ordered_sets((r["set"] for r in rows if r["metric"] == metric), groups)
            threshold, label = thresholds.get(metric), axis_label(metric)
            xs, ys, keys = band_series(rows, metric, sets, groups, threshold, ood_bands=("q50",))
            logged[f"curves/{metric}"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=keys, xname="inversion step",
                title=f"{label} per inversion step: medians, InD's 10/50/90%")
            for set_name in (s for s in sets if s != IND):
                xs, ys, keys = band_series(rows, metric, [s for s in (IND, set_name) if s in sets], groups,
                                           threshold)
                logged[f"curves/{metric}/{set_name}"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, xname="inversion step",
                    title=f"{label} per inversion step: {set_label(set_name, groups)} against InD (10/50/90%)")
        run.log(logged)
