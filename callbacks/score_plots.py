"""Histograms of each detector's scores: InD test against each OOD test set."""

from __future__ import annotations

import lightning as L

from diffguard_pl.callbacks._common import output_folder, save_figure


class ScoreDistributionPlot(L.Callback):
    """Draws ``scores/<detector>.png`` from the evaluator's gathered records (rank 0 only)."""

    def __init__(self, bins: int = 40) -> None:
        self.bins = bins

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the evaluator's own on_test_epoch_end has gathered the records.
        records = getattr(pl_module, "all_records", None)
        if not trainer.is_global_zero or not records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from diffguard_pl.detectors.fused import detector_columns

        split = getattr(pl_module, "split", "test")
        folder = output_folder(trainer, "scores")
        sets = list(dict.fromkeys(s for s, sp in zip(records["set"], records["split"]) if sp == split))
        for detector in detector_columns(records):
            by_set = {s: [v for v, name, sp in zip(records[detector], records["set"], records["split"])
                          if name == s and sp == split] for s in sets}
            every = [v for values in by_set.values() for v in values]
            if not every:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.5))
            lo, hi = min(every), max(every)
            span = max(hi - lo, 1e-6 * max(1.0, abs(hi)))  # near-constant scores still get finite bins
            edges = [lo + span * k / self.bins for k in range(self.bins + 1)]
            for set_name, values in by_set.items():
                ax.hist(values, bins=edges, histtype="step", density=True, label=set_name)
            ax.set_xlabel(f"{detector} score (higher = more OOD)")
            ax.set_ylabel("density (each set's histogram integrates to 1)")
            ax.set_title(f"{detector}: {split} split, InD against each OOD set", fontsize=9)
            ax.legend(fontsize=7)
            name = detector.replace("/", "_")
            save_figure(fig, folder / f"{name}.png", trainer, f"scores/{name}")
