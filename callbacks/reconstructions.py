"""A grid per data set: input, guided synthesis, the unguided reconstruction when it is the reference, and the
|difference| heat map on one colour scale; each column titled with the predicted (and true) class and the score."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import lightning as L

from diffguard_pl.callbacks._common import gather_to_rank_zero, output_folder, save_figure, set_label, wandb_run


def class_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    """The name of InD class ``label`` (its index when the benchmark has no names)."""
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


def score_label(score: str, value: float) -> str:
    """``L2 = 0.00457``, ``-PSNR = -23.4 dB``: the DiffGuard score with its symbol and unit."""
    from diffguard_pl.records.columns import DISTANCES

    distance = DISTANCES.get(score)
    return f"{distance.symbol if distance else score} = {value:.3g}{distance.suffix if distance else ''}"


def reconstruction_figure(title: str, rows: List[dict], score: str, reference: str = "input",
                          class_names: Optional[Sequence[str]] = None):
    """The grid of one set: a column per sample (``rows``: input, synthesis, reference, pred, label, score).

    Rows: input; synthesis; with ``reference="unguided"`` the unguided reconstruction (with ``"input"`` the
    reference is the input, so no row repeats it); |synthesis - reference| averaged over channels, every sample
    on one colour scale, with a colour bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    against = "input" if reference == "input" else "reconstruction"
    titles = ["input", "guided\nsynthesis"] + ([] if reference == "input" else ["unguided\nreconstruction"])
    titles.append(f"|synthesis -\n{against}|")
    diffs = [(r["synthesis"] - r["reference"]).abs().mean(0) for r in rows]
    vmax = max([float(d.max()) for d in diffs] + [1e-6])
    fig, axes = plt.subplots(len(titles), len(rows), figsize=(1.35 * len(rows) + 1.6, 1.45 * len(titles) + 0.9),
                             squeeze=False, layout="constrained")  # room for the titles and the colour bar
    for j, (r, diff) in enumerate(zip(rows, diffs)):
        panels = [r["input"], r["synthesis"]] + ([] if reference == "input" else [r["reference"]])
        for i, image in enumerate(panels):
            shown = image.permute(1, 2, 0).clamp(0, 1).numpy()
            axes[i, j].imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1)
        heat = axes[-1, j].imshow(diff.numpy(), cmap="inferno", vmin=0, vmax=vmax)
        caption = f"pred {class_name(r['pred'], class_names)}"
        if r["label"] >= 0:
            caption += f"\ntrue {class_name(r['label'], class_names)}"
        axes[0, j].set_title(f"{caption}\n{score_label(score, r['score'])}", fontsize=7)
        for i in range(len(titles)):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, name in enumerate(titles):
        axes[i, 0].set_ylabel(name, fontsize=7)
    bar = fig.colorbar(heat, ax=list(axes[-1, :]), fraction=0.05, pad=0.01)
    bar.set_label("mean over channels\n(intensity on [0, 1])", fontsize=6)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    return fig


class ReconstructionLogger(L.Callback):
    """Keeps ``per_set`` test samples of every set and draws them at the end (:func:`reconstruction_figure`).

    ``select="first"``: the first by sample id; ``select="extremes"``: the half with the lowest and the half with
    the highest DiffGuard score ``score`` (for InD the best cases come first, for OOD the worst: an OOD sample
    with a low score is one DiffGuard misses). ``class_names`` (the benchmark's) name the predicted and true
    classes. Writes ``reconstructions/<set>.png`` and, with W&B, logs them as images under
    ``reconstructions/<set>``. Rank 0 draws after gathering and keeps what it drew in ``shown`` (set -> rows, as
    drawn), which the W&B table of these samples reads (diffguard_pl/jobs/wandb_samples.py). Both choices depend
    only on the samples, not on batches or processes (ties broken by id).
    """

    def __init__(self, per_set: int = 8, select: str = "first", score: str = "l2",
                 class_names: Optional[Sequence[str]] = None, groups: Optional[Mapping[str, str]] = None,
                 resumed: int = 0) -> None:
        if select not in ("first", "extremes"):
            raise ValueError(f"callbacks.reconstruction_select: {select!r} is not one of first, extremes")
        self.per_set, self.select, self.score = per_set, select, score
        self.class_names = list(class_names) if class_names else None
        self.groups, self.resumed = dict(groups or {}), resumed  # OOD set -> near / far; samples of earlier runs
        self.kept: Dict[str, List[dict]] = {}
        self.shown: Dict[str, List[dict]] = {}
        self.reference = "input"

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.kept, self.shown = {}, {}
        cfg = getattr(getattr(pl_module, "pipeline", None), "cfg", None)
        self.reference = getattr(cfg, "reference", "input")

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

    def _title(self, set_name: str, groups: Mapping[str, str], count: int, resumed: int) -> str:
        low = (count + 1) // 2
        if self.select == "first":
            chosen = f"the first {count} test samples by id"
        elif count < self.per_set:
            chosen = f"all {count} test samples, by {self.score} score"
        else:
            chosen = f"the {low} lowest and the {count - low} highest {self.score} scores"
        note = (f" (samples of this run only: {resumed:,} samples came from an earlier, resumed run)"
                if resumed else "")
        return f"{set_label(set_name, groups)}: {chosen}{note}"

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = gather_to_rank_zero(self.kept)
        if not trainer.is_global_zero:
            return
        merged: Dict[str, List[dict]] = {}
        for part in gathered:
            for set_name, rows in part.items():
                merged.setdefault(set_name, []).extend(rows)
        folder = output_folder(trainer.default_root_dir, "reconstructions")
        for set_name, rows in merged.items():
            rows = self.shown[set_name] = self._keep(rows)
            fig = reconstruction_figure(self._title(set_name, self.groups, len(rows), self.resumed), rows, self.score,
                                        self.reference, self.class_names)
            save_figure(fig, folder / f"{set_name}.png", wandb_run(trainer), f"reconstructions/{set_name}")
