"""Merge the finished shards of one or more evaluation folders into results.json and scores.csv.

For runs split by hand (``evaluate.py shard=i/n`` on separate jobs):

    python -m diffguard_pl.merge OUT_0 OUT_1 OUT_2 OUT_3 --output OUT

All shards must come from the same config (their fingerprints must match);
a sample present in several folders is counted once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from diffguard_pl.config import ConfigError
from diffguard_pl.results import finalize, format_table, write_json, write_scores_csv
from diffguard_pl.shards import SHARD_DIR, read_shard, records_to_columns


def merge(folders: List[Path], output: Path) -> dict:
    header, rows, seen = None, [], set()
    for folder in folders:
        files = sorted((folder / SHARD_DIR).glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no shard files in {folder / SHARD_DIR}: is {folder} an evaluation output_dir?")
        for path in files:
            head, records, _ = read_shard(path)
            if not head:
                continue
            if header is None:
                header = head
            elif head["fingerprint"] != header["fingerprint"]:
                raise ConfigError(f"{path} comes from another config than {folders[0]}; refusing to merge")
            for record in records:
                if record["id"] not in seen:
                    seen.add(record["id"])
                    rows.append(record)
    rows.sort(key=lambda r: (r["split"], r["set"], r["id"]))
    records = records_to_columns(rows)
    results = finalize(records, header["score"], header["groups"], header["split"], 0.0, 0)
    output.mkdir(parents=True, exist_ok=True)
    write_json(results, output / "results.json")
    write_scores_csv(records, output / "scores.csv")
    print(format_table(results, header["groups"]))
    print(f"merged {len(rows)} samples from {len(folders)} folder(s) into {output}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        merge(args.folders, args.output)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
