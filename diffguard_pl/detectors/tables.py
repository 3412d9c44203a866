"""The detector registry as Markdown: the tables docs/detectors.md holds (tests/test_registry.py keeps them equal),
each detector with its paper. Imports pytorch-ood (the classifier detectors' papers are its ``info``)."""

from __future__ import annotations

import importlib
from typing import Optional

from diffguard_pl.detectors.registry import CLASSIFIER_DETECTORS, DIFFUSION_DETECTORS, Detector


def paper(entry: Detector) -> Optional[tuple]:
    """(title, venue, year, url) of the paper that introduced a detector, from pytorch-ood's ``info`` (imports
    pytorch-ood); None for a detector no single paper introduced."""
    if not entry.paper_class:
        return None
    module, _, cls = entry.paper_class.rpartition(".")
    found = getattr(getattr(importlib.import_module(module), cls).info, "paper", None)
    return None if found is None else (found.title, found.venue, found.year, found.url)


def classifier_table() -> str:
    """The table of classifier detectors as Markdown (docs/detectors.md), with each one's paper (imports
    pytorch-ood)."""
    rows = ["| name | reads | needs | fit on InD train | grid (source) | runs by default | implementation | paper |",
            "|---|---|---|---|---|---|---|---|"]
    for d in CLASSIFIER_DETECTORS:
        module, _, cls = d.implementation.rpartition(".")
        fits = getattr(getattr(importlib.import_module(module), cls), "requires_fit", False)
        grid = ", ".join(f"{k}: {'by feature width' if callable(v) else list(v)}" for k, v in d.grid.items())
        found = paper(d)
        cite = f"[{found[0]}]({found[3]}) ({found[1]} {found[2]})" if found else "-"
        needs = ", ".join(sorted(d.needs)) or "-"
        what = f"{d.implementation.replace('diffguard_pl.detectors.', '')}"
        if d.unavailable:
            what += f"; **not run**: {d.unavailable}"
        elif d.note:
            what += f"; {d.note}"
        default = "yes" if d.default and not d.unavailable else "no"
        rows.append(f"| `{d.name}` | {d.reads} | {needs} | {'yes' if fits else 'no'} | "
                    f"{grid + f' ({d.grid_source})' if grid else '-'} | {default} | {what} | {cite} |")
    return "\n".join(rows)


def diffusion_table() -> str:
    """The table of diffusion detectors as Markdown (docs/detectors.md and docs/diffusion_detectors.md)."""
    rows = ["| name | fitted on | parameters (defaults) | validation grid | UNet evaluations per image | the authors' "
            "code runs | paper |", "|---|---|---|---|---|---|---|"]
    for d in DIFFUSION_DETECTORS:
        defaults = ", ".join(f"{k}={v}" for k, v in d.defaults.items())
        grid = ", ".join(f"{k}: {list(v)}" for k, v in d.grid.items())
        title, venue, year, url = d.paper
        rows.append(f"| `{d.name}` | {d.fit_on} | {defaults} | {grid} | {d.cost_formula} (defaults: "
                    f"{d.cost(d.defaults)}) | {d.authors} ([code]({d.code})) | [{title}]({url}) ({venue} {year}) |")
    return "\n".join(rows)
