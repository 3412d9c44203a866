"""A grid per data set: input, predicted label, guided synthesis, reference, |difference| heat map."""

from __future__ import annotations

from typing import Dict, List

import lightning as L

from diffguard_pl.callbacks._common import gather_to_rank_zero, output_folder, save_figure


class ReconstructionLogger(L.Callback):
    """Keeps ``per_set`` test samples of every set and draws them at the end.

    ``select="first"``: the first by sample id; ``select="extremes"``: the half with the lowest and the half with
    the highest DiffGuard score ``score`` (for InD the best cases come first, for OOD the worst: an OOD sample
    with a low score is one DiffGuard misses). Writes ``reconstructions/<set>.png`` and, with W&B, logs them as
    images under ``reconstructions/<set>``. Rank 0 draws after gathering. Both choices depend only on the
    samples, not on batches or processes (ties broken by id).
    """

    def __init__(self, per_set: int = 8, select: str = "first", score: str = "l2") -> None:
        if select not in ("first", "extremes"):
            raise ValueError(f"callbacks.reconstruction_select: {select!r} is not one of first, extremes")
        self.per_set, self.select, self.score = per_set, select, score
        self.kept: Dict[str, List[dict]] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.kept = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None:
            return
        for i, (set_name, split) in enumerate(zip(batch["set"], batch["split"])):
            if split != "test":
                continue
            kept = self.kept.setdefault(set_name, [])
            kept.append({
                "id": batch["id"][i], "pred": int(outputs["pred"][i]), "label": int(batch["label"][i]),
                "input": batch["image"][i].cpu(), "synthesis": outputs["synthesis"][i].cpu(),
                "reference": outputs["reference"][i].cpu(), "score": float(outputs["scores"][self.score][i]),
            })
            self.kept[set_name] = self._keep(kept)

    def _keep(self, rows: List[dict]) -> List[dict]:
        rows = sorted({r["id"]: r for r in rows}.values(), key=lambda r: r["id"])
        if self.select == "first":
            return rows[: self.per_set]
        rows.sort(key=lambda r: (r["score"], r["id"]))
        low = (self.per_set + 1) // 2
        high = self.per_set - low
        return rows if len(rows) <= self.per_set else rows[:low] + rows[len(rows) - high:]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = gather_to_rank_zero(self.kept)
        if not trainer.is_global_zero:
            return
        merged: Dict[str, List[dict]] = {}
        for part in gathered:
            for set_name, rows in part.items():
                merged.setdefault(set_name, []).extend(rows)
        folder = output_folder(trainer, "reconstructions")
        previous = getattr(pl_module, "previous", None) or {}
        resumed = len(previous.get("id", []))
        for set_name, rows in merged.items():
            rows = self._keep(rows)
            note = (f" (samples of this run only: {resumed:,} samples came from an earlier, resumed run)"
                    if resumed else "")
            save_figure(self._figure(set_name + note, rows), folder / f"{set_name}.png", trainer,
                        f"reconstructions/{set_name}")

    @staticmethod
    def _figure(set_name: str, rows: List[dict]):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        titles = ("input", "synthesis", "reference", "|synthesis - reference|")
        fig, axes = plt.subplots(4, len(rows), figsize=(1.3 * len(rows), 5.6), squeeze=False)
        for j, r in enumerate(rows):
            diff = (r["synthesis"] - r["reference"]).abs().mean(0)
            panels = [r["input"], r["synthesis"], r["reference"]]
            for i, image in enumerate(panels):
                shown = image.permute(1, 2, 0).clamp(0, 1).numpy()
                axes[i, j].imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1)
            axes[3, j].imshow(diff.numpy(), cmap="inferno", vmin=0, vmax=max(float(diff.max()), 1e-6))
            title = f"pred {r['pred']}" + (f" / y {r['label']}" if r["label"] >= 0 else "")
            axes[0, j].set_title(title + (f"\n{r['score']:.3g}" if "score" in r else ""), fontsize=7)
            for i in range(4):
                axes[i, j].axis("off")
        for i, title in enumerate(titles):
            axes[i, 0].text(-0.15, 0.5, title, transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=7)
        fig.suptitle(set_name, fontsize=8)
        return fig
