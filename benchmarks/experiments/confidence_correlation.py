"""How much of DiffGuard's score is the classifier's confidence: the Spearman rank correlation, per set and over
all samples, between a DiffGuard column of scores.csv and another detector's (default: ``msp``, whose score is
-max softmax, so a positive correlation means "DiffGuard scores high where the classifier is unsure").

    python -m benchmarks.experiments.confidence_correlation outputs/diagnosis/gdm_scale3/depth10 [--column diffguard/l2]

Reads only scores.csv (any split; no model runs). Ties get their average rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.experiments.common import score_rows


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) of ``values``, ties sharing the mean of their positions."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    position = torch.arange(1, len(values) + 1, dtype=torch.float64)
    out = torch.empty(len(values), dtype=torch.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start:end + 1]] = position[start:end + 1].mean()
        start = end + 1
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def correlations(rows: list, column: str, other: str) -> dict:
    """rho per set (in the order met) and over every row ("all")."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    pick = lambda rs, c: torch.tensor([float(r[c]) for r in rs], dtype=torch.float64)  # noqa: E731
    out = {s: spearman(pick(mine, column), pick(mine, other)) for s in sets
           for mine in [[r for r in rows if r["set"] == s]]}
    out["all"] = spearman(pick(rows, column), pick(rows, other))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="evaluation output folders (their scores.csv)")
    parser.add_argument("--column", default="diffguard/l2", help="the DiffGuard column (default diffguard/l2)")
    parser.add_argument("--against", default="msp", help="the other detector's column (default msp)")
    args = parser.parse_args(argv)
    found = {}
    for folder in args.folders:
        rows = score_rows(folder)
        missing = [c for c in (args.column, args.against) if rows and c not in rows[0]]
        if missing:
            raise SystemExit(f"error: {folder / 'scores.csv'} has no column {', '.join(missing)}")
        found[str(folder)] = rho = correlations(rows, args.column, args.against)
        print(f"{folder}: Spearman rho({args.column}, {args.against}): "
              + ", ".join(f"{s} {v:+.2f}" for s, v in rho.items()))
    return found


if __name__ == "__main__":
    main()
