"""What the evaluation callbacks share: gathering to rank 0, how each set is drawn, figures, and logging to W&B
or files.

Two kinds of callback draw an evaluation: those that watch the test loop (Lightning hooks: progress,
reconstructions, which need the images) and those that draw from the finished records (``on_report``: score
histograms and inversion curves), which the report (diffguard_pl/jobs/report.py) calls once with every record
and the derived detectors, the same for a fresh run, a resumed one and a merge of shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

import lightning as L
import torch.distributed as dist

from diffguard_pl.data.benchmark import IND


def gather_to_rank_zero(obj: Any) -> List[Any]:
    """Every rank's ``obj`` on rank 0 (a list, one entry per rank); other ranks get []."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if dist.get_rank() == 0 else []


def ordered_sets(sets: Iterable[str], groups: Mapping[str, str]) -> List[str]:
    """InD first, then the OOD sets in the benchmark's order (``groups``), then any other set (a scored folder)."""
    present = list(dict.fromkeys(sets))
    known = [IND] + list(groups)
    return [s for s in known if s in present] + [s for s in present if s not in known]


def set_label(set_name: str, groups: Mapping[str, str]) -> str:
    """``InD``, ``digits_6to9 (near-OOD)``, ``faces (far-OOD)``; a set without a group keeps its name."""
    if set_name == IND:
        return "InD"
    return f"{set_name} ({groups[set_name]}-OOD)" if set_name in groups else set_name


# OOD colours: matplotlib's default cycle without its grey (C7), which InD's grey band and fill use.
OOD_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")


def set_styles(sets: Iterable[str], groups: Mapping[str, str]) -> Dict[str, dict]:
    """matplotlib line keywords per set, the same in every plot: InD black, thick and on top; near-OOD sets
    dashed, far-OOD sets solid, each in its own colour (:data:`OOD_COLOURS`, in the order of ``sets``)."""
    styles, colour = {}, 0
    for set_name in sets:
        if set_name == IND:
            styles[set_name] = {"color": "black", "linewidth": 2.4, "linestyle": "-", "zorder": 3}
        else:
            styles[set_name] = {"color": OOD_COLOURS[colour % len(OOD_COLOURS)], "linewidth": 1.4, "zorder": 2,
                                "linestyle": "--" if groups.get(set_name) == "near" else "-"}
            colour += 1
        styles[set_name]["label"] = set_label(set_name, groups)
    return styles


def wandb_run(trainer: L.Trainer):
    """The W&B run behind the trainer's logger, or None when W&B is not in use."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return logger.experiment
    return None


def output_folder(root: str | Path, name: str) -> Path:
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig, path: Path, run, key: str) -> None:
    """Write a matplotlib figure as PNG and, with a W&B ``run`` (None without W&B), log it as an image under
    ``key``."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    if run is not None:
        import wandb

        run.log({key: wandb.Image(str(path))})
    plt.close(fig)
