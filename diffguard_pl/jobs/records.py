"""Per-sample records on disk: incremental, resumable, mergeable.

Each process appends the records of every finished batch to its own JSON-lines file in
``OUTPUT/records/`` and flushes and fsyncs it, so a run killed at any point keeps what it finished. The
first line of each file is a header with the fingerprint of everything that can change a score (the
config without its neutral keys, see :func:`result_config`, and the model files); a resumed run, and a
merge, read only files of one fingerprint and refuse others, naming the keys that differ. A torn last line
(a crash in the middle of a write) is dropped. :func:`read_records` is the one reader: resume and merge
both use it, and both keep one record per sample id.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from diffguard_pl.errors import ConfigError

RECORD_DIR = "records"


def neutral_keys(schema, prefix: str = "") -> List[str]:
    """Dotted names of the schema's fields marked ``neutral`` (they never change a sample's score)."""
    keys = []
    for f in fields(schema):
        if f.metadata.get("neutral"):
            keys.append(prefix + f.name)
        elif is_dataclass(f.type) or (f.default_factory is not None and is_dataclass(f.default_factory)):
            keys += neutral_keys(f.default_factory if is_dataclass(f.default_factory) else f.type,
                                 f"{prefix}{f.name}.")
    return keys


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key, {})
    tree.pop(leaf, None)


def _model_files(path: str) -> List[dict]:
    """Size and modification time of a model folder's (or file's) files: a retrained model changes the fingerprint."""
    from diffguard_pl.models.files import resolve_model_path

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
    for key in neutral_keys(type(cfg)):
        _drop(tree, key)
    paths = {name: tree["models"][name] for name in ("classifier", "diffusion") if name in tree.get("models", {})}
    tree["model_files"] = {name: _model_files(path) for name, path in paths.items()}
    return tree


def fingerprint(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def differences(a, b, prefix: str = "") -> List[str]:
    """``key: old then, new now`` for every leaf where two config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} then, {b!r} now"]


class RecordWriter:
    """Appends the records of one process to ``OUTPUT/records/part-r<rank>-<time>.jsonl``."""

    def __init__(self, output_dir: str | Path, rank: int, header: dict):
        folder = Path(output_dir) / RECORD_DIR
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


def read_file(path: Path) -> Tuple[dict, List[dict], bool]:
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
            raise ConfigError(f"{path}: line {number + 1} is corrupt (not the last line, so not a torn write); "
                              f"delete the file to recompute its samples") from None
    if not rows:
        return {}, [], torn
    return rows[0], rows[1:], torn


def read_records(folders: Sequence[str | Path], header: Optional[dict] = None,
                 what: str = "resuming") -> Tuple[Optional[dict], Dict[str, dict], int]:
    """(header, records by sample id, torn lines) of every record file in ``folders``.

    Every file must carry ``header``'s fingerprint (or, without one, the first file's); otherwise
    :class:`ConfigError` names the folder and the config keys that differ. The first record of a sample id
    is kept.
    """
    finished: Dict[str, dict] = {}
    torn = 0
    for folder in folders:
        directory = Path(folder) / RECORD_DIR
        for path in sorted(directory.glob("*.jsonl")) if directory.is_dir() else []:
            head, records, was_torn = read_file(path)
            torn += int(was_torn)
            if not head:
                continue
            if header is None:
                header = head
            elif head.get("fingerprint") != header["fingerprint"]:
                changes = differences(head.get("config", {}), header.get("config", {})) or ["(unknown)"]
                raise ConfigError(
                    f"{folder} holds results of another config ({path.name}); not {what}, as that would mix results. "
                    f"Differences: {'; '.join(changes[:8])}. Use another output_dir, or delete {directory} to start "
                    f"over."
                )
            for record in records:
                finished.setdefault(record["id"], record)
    return header, finished, torn


def has_records(output_dir: str | Path) -> bool:
    return any((Path(output_dir) / RECORD_DIR).glob("*.jsonl"))


def records_to_columns(rows: List[dict]) -> Dict[str, list]:
    if not rows:
        return {}
    columns = list(rows[0])
    return {c: [r.get(c) for r in rows] for c in columns}


@dataclass
class Work:
    """What an evaluation run has to do in ``output_dir``: the samples it covers (its shard of ``ids``), those
    an earlier run with the same fingerprint finished there (resume), and the header its record files carry."""

    header: dict
    ids: List[str]  # every sample of the evaluated sets, in their order
    wanted: List[int]  # indices into ids: this run's samples (a shard=i/n run: every n-th)
    todo: List[int]  # of wanted, those not finished yet
    previous: Dict[str, list]  # the finished records of wanted samples, as columns
    torn: int  # torn last lines dropped from record files (an earlier run was killed mid-write)


def plan_work(header: dict, ids: List[str], output_dir: Path, resume: bool,
              part: Optional[Tuple[int, int]]) -> Work:
    """Resume's one home: read what ``output_dir`` finished under ``header``'s fingerprint (ConfigError naming
    the differing keys otherwise) and list what is left. ``resume=False`` refuses a folder holding records."""
    if resume:
        _, finished, torn = read_records([output_dir], header)
    elif has_records(output_dir):
        raise ConfigError(f"{output_dir} holds finished samples of an earlier run and resume=false: "
                          f"use another output_dir or delete {Path(output_dir) / RECORD_DIR}")
    else:
        finished, torn = {}, 0
    wanted = [i for i in range(len(ids)) if part is None or i % part[1] == part[0]]
    todo = [i for i in wanted if ids[i] not in finished]
    previous = records_to_columns([finished[ids[i]] for i in wanted if ids[i] in finished])
    return Work(header, ids, wanted, todo, previous, torn)
