"""Per-step inversion quality curves (PSNR, SSIM, 1 - DISTS), per data set, for tuning AES."""

from __future__ import annotations

import csv
from collections import defaultdict
from typing import Dict, List

import lightning as L
import torch

from diffguard_pl.callbacks._common import output_folder, save_figure, wandb_run

QUANTILES = (0.1, 0.5, 0.9)


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
    metrics = [c[len("curve/"):] for c in records if c.startswith("curve/")]
    for i, set_name in enumerate(records["set"]):
        for metric in metrics:
            values = records[f"curve/{metric}"][i]
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


class InversionCurveLogger(L.Callback):
    """Draws each set's per-step inversion quality after ``trainer.test`` of a DiffGuardEvaluator.

    Reads the per-sample curves from the evaluator's records (``curve/<metric>``), so a resumed run's plots
    cover the samples of earlier runs too. Writes ``curves/curves.csv`` (mean and quantiles per set, metric
    and step), ``curves/<metric>.png`` (mean and 10-90% band, InD against each OOD set on one chart) and,
    with W&B, line plots under ``curves/<metric>`` plus the PNGs. Rank 0 only (the records are gathered).
    """

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = getattr(pl_module, "all_records", None)
        if not trainer.is_global_zero or not records:
            return
        curves = curves_from_records(records)
        if not curves:
            return
        rows = summarize_curves(curves)
        folder = output_folder(trainer, "curves")
        with open(folder / "curves.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        self._plot(rows, folder, trainer)

    def _plot(self, rows: List[dict], folder, trainer: L.Trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        run = wandb_run(trainer)
        for metric in sorted({r["metric"] for r in rows}):
            fig, ax = plt.subplots(figsize=(6, 4))
            series = {}
            for set_name in dict.fromkeys(r["set"] for r in rows):
                mine = [r for r in rows if r["metric"] == metric and r["set"] == set_name]
                steps = [r["step"] for r in mine]
                ax.plot(steps, [r["mean"] for r in mine], label=set_name)
                ax.fill_between(steps, [r["q10"] for r in mine], [r["q90"] for r in mine], alpha=0.15)
                series[set_name] = (steps, [r["mean"] for r in mine])
            ax.set_xlabel("inversion step")
            ax.set_ylabel(metric)
            ax.legend(fontsize=7)
            ax.set_title(f"{metric} of x_t against x0 (mean, 10-90%)")
            if run is not None:
                import wandb

                width = max(len(s[0]) for s in series.values())
                run.log({f"curves/{metric}": wandb.plot.line_series(
                    xs=list(range(1, width + 1)),
                    ys=[s[1] + [float("nan")] * (width - len(s[1])) for s in series.values()],
                    keys=list(series), title=f"{metric} per inversion step", xname="inversion step")})
            save_figure(fig, folder / f"{metric}.png", trainer, f"curves/{metric}_png")
