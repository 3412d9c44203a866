"""Incremental, resumable per-sample results.

Each process appends the records of every finished batch to its own JSON-lines
file in ``OUTPUT/shards/`` and flushes and fsyncs it, so a run killed at any
point keeps what it finished. The first line of each file is a header with
the fingerprint of everything that can change a score (models, steps,
thresholds, data); a later run resumes only from files with the same
fingerprint and refuses others, naming the keys that differ. A torn last line
(a crash in the middle of a write) is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from omegaconf import OmegaConf

from diffguard_pl.config import ConfigError

SHARD_DIR = "shards"
# Keys that never change a sample's score: where and how the run executes and logs.
NEUTRAL_KEYS = (
    "output_dir", "logger", "wandb", "callbacks", "resume", "shard", "dry_run",
    "data.eval_batch_size", "data.batch_size", "data.num_workers", "data.decode_workers", "limit_per_set", "split",
    *(f"trainer.{k}" for k in ("accelerator", "devices", "num_nodes", "strategy", "max_steps", "max_epochs",
                                          "log_every_n_steps", "check_val_every_n_epoch", "limit_train_batches",
                                          "limit_val_batches", "enable_progress_bar", "deterministic")),
)  # trainer.precision is not neutral: it changes the scores


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key, {})
    tree.pop(leaf, None)


def _model_files(path: str) -> List[dict]:
    """Size and modification time of a model folder's (or file's) files: a retrained model changes the fingerprint."""
    from diffguard_pl.models.diffusion import resolve_model_path

    try:
        root = resolve_model_path(path)  # a Hub id: its snapshot in the local cache
    except FileNotFoundError:
        return []
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
    return [{"file": str(p.relative_to(root)) if p != root else p.name, "size": p.stat().st_size,
             "mtime": int(p.stat().st_mtime)} for p in files]


def result_config(cfg) -> dict:
    """The part of an evaluation config that determines per-sample results."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    for key in NEUTRAL_KEYS:
        _drop(tree, key)
    paths = {name: tree["models"][name] for name in ("classifier", "diffusion") if name in tree.get("models", {})}
    tree["model_files"] = {name: _model_files(path) for name, path in paths.items()}
    return tree


def fingerprint(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _differences(a, b, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} then, {b!r} now"]


class ShardWriter:
    """Appends records of one process to ``OUTPUT/shards/part-r<rank>-<time>.jsonl``."""

    def __init__(self, output_dir: str | Path, rank: int, header: dict):
        folder = Path(output_dir) / SHARD_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"part-r{rank}-{time.time_ns()}.jsonl"
        self._handle = open(self.path, "a", encoding="utf-8")
        self._write([header])

    def _write(self, lines: Iterable[dict]) -> None:
        self._handle.write("".join(json.dumps(line) + "\n" for line in lines))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def append(self, records: Dict[str, list]) -> None:
        columns = list(records)
        self._write({c: records[c][i] for c in columns} for i in range(len(records[columns[0]])))

    def close(self) -> None:
        self._handle.close()


def read_shard(path: Path) -> Tuple[dict, List[dict], bool]:
    """(header, records, torn) of one file; a torn (unparseable) last line is dropped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows, torn = [], False
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                torn = True
                break
            raise ValueError(f"{path}: line {number + 1} is corrupt (not the last line, so not a torn write)")
    if not rows:
        return {}, [], torn
    return rows[0], rows[1:], torn


def load_finished(output_dir: str | Path, header: dict) -> Tuple[Dict[str, dict], int]:
    """Records already finished in ``output_dir`` for this fingerprint, by sample id; and the torn-line count.

    Raises :class:`ConfigError` when a shard was written under another config.
    """
    folder = Path(output_dir) / SHARD_DIR
    finished: Dict[str, dict] = {}
    torn = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        head, records, was_torn = read_shard(path)
        torn += int(was_torn)
        if not head:
            continue
        if head.get("fingerprint") != header["fingerprint"]:
            changes = _differences(head.get("config", {}), header["config"]) or ["(unknown)"]
            raise ConfigError(
                f"{output_dir} holds results of a run with another config ({path.name}); not resuming, as that "
                f"would mix results. Differences: {'; '.join(changes[:8])}. Use another output_dir, or delete "
                f"{folder} to start over."
            )
        for record in records:
            finished.setdefault(record["id"], record)
    return finished, torn


def parse_shard(spec: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"i/n"`` -> (i, n), the slice of the samples this run evaluates (index modulo n equals i)."""
    if spec is None:
        return None
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ConfigError(f"shard={spec!r} must look like i/n, e.g. shard=0/4") from None
    if not 0 <= index < count:
        raise ConfigError(f"shard={spec!r}: need 0 <= i < n")
    return index, count


def records_to_columns(rows: List[dict]) -> Dict[str, list]:
    if not rows:
        return {}
    columns = list(rows[0])
    return {c: [r[c] for r in rows] for c in columns}
