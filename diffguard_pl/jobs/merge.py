"""Merge the finished records of one or more evaluation folders into results.json and scores.csv.

For runs split by hand (``evaluate.py shard=i/n`` on separate jobs):

    python -m diffguard_pl.jobs.merge OUT_0 OUT_1 OUT_2 OUT_3 --output OUT

All records must come from the same config (their fingerprints must match; the error names the keys that
differ);
a sample present in several folders is counted once.

``--partners`` fuses DiffGuard with other classifier detectors than the run's ``fusion_partners`` (``all``: every
classifier detector in the records), from the records alone: a fused score needs no new model call.

    python -m diffguard_pl.jobs.merge outputs/fashion_gdm --output outputs/fashion_gdm_all_fused --partners all
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from diffguard_pl.errors import ConfigError
from diffguard_pl.jobs.report import report
from diffguard_pl.records.store import RECORD_DIR, has_records, read_records, records_to_columns, sort_rows


def merge(folders: List[Path], output: Path, partners: Optional[List[str]] = None) -> dict:
    """Merge the records of ``folders`` (one fingerprint; a sample counted once) into ``output``; ``partners``
    (names, or ``["all"]``) replaces the run's fusion partners."""
    for folder in folders:
        if not has_records(folder):
            raise ConfigError(f"no record files in {folder / RECORD_DIR}: is {folder} an evaluation output_dir?")
    header, finished, _ = read_records(folders, what="merging")
    records = records_to_columns(sort_rows(finished.values()))
    if partners:
        header = {**header, "partners": fusion_partners(partners, records)}
    timing = {"images": 0, "loop_seconds": 0.0, "wall_seconds": None}  # the shards' own results.json time them
    results = report(records, header, output, timing, folders=folders, listeners=report_listeners())
    print(f"merged {len(finished)} samples from {len(folders)} folder(s) into {output}")
    return results


def report_listeners() -> list:
    """The record-drawing callbacks: the merge's plots cover every shard's samples."""
    from diffguard_pl.callbacks import InversionCurveLogger, ScoreDistributionPlot

    return [InversionCurveLogger(), ScoreDistributionPlot()]


def fusion_partners(names: List[str], records: dict) -> List[str]:
    """The partners asked for, checked against the classifier detectors the records hold (``all``: every one)."""
    from diffguard_pl.detectors import registry

    held = [name for name in registry.names() if name in records]
    if names == ["all"]:
        return held
    missing = [name for name in names if name not in held]
    if missing:
        raise ConfigError(f"--partners {','.join(missing)}: not among the classifier detectors in these records "
                          f"({', '.join(held)})")
    return list(names)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--partners", default=None,
                        help="comma-separated classifier detectors to fuse DiffGuard with, or 'all'")
    args = parser.parse_args(argv)
    try:
        merge(args.folders, args.output, args.partners.split(",") if args.partners else None)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
