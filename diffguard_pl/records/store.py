"""The record store: per-sample records on disk, written incrementally, resumed, collected and merged.

Each process appends the records of every finished batch to its own JSON-lines file in ``OUTPUT/records/``
and flushes and fsyncs it, so a run killed at any point keeps what it finished. The first line of each file is
a header with the fingerprint of everything that can change a score (the config without its neutral keys, see
:func:`result_config`, and the model files); a resumed run, and a merge, read only files of one fingerprint and
refuse others, naming the keys that differ. A torn last line (a crash in the middle of a write) is dropped.
:func:`read_records` is the one reader: resume, the end of a run (every process's records, read back from
disk) and merge all use it, and all keep one record per sample id, in one order (:func:`sort_rows`).

One writer at a time: a run holds ``OUTPUT/records/.lock`` (an advisory lock the system drops when the process
ends) from planning its work to writing its outputs; a second run on the same folder is refused, naming the
first. A full disk or another write failure ends the run with one line naming the file and the fix; what was
written before stays valid, and the same command resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from diffguard_pl.errors import ConfigError, UserError
from diffguard_pl.records.columns import ID, SET, SPLIT, check_columns

RECORD_DIR = "records"
LOCK = ".lock"


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
    detectors = tree.get("diffusion_detectors")
    if detectors is not None and not detectors["names"]:
        del tree["diffusion_detectors"]  # none run: a config without them keeps the fingerprint it had before
    elif detectors is not None and detectors["model"] is not None:
        paths["diffusion_detectors"] = detectors["model"]
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
        self.path = folder / f"part-r{rank}-{time.time_ns()}.jsonl"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        except OSError as error:
            raise write_failure(self.path, error) from None
        self._write([header])

    def _write(self, lines: Iterable[dict]) -> None:
        try:
            self._handle.write("".join(json.dumps(line) + "\n" for line in lines))
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise write_failure(self.path, error) from None

    def append(self, records: Dict[str, list]) -> List[dict]:
        """Append a batch's records (columns; every column must be declared in diffguard_pl/records/columns.py);
        returns them as rows."""
        check_columns(list(records))
        rows = columns_to_records(records)
        self._write(rows)
        return rows

    def close(self) -> None:
        self._handle.close()


def write_failure(path: Path, error: OSError) -> UserError:
    """One line for a failed write of the records: what failed, that finished samples are kept, the fix."""
    cause = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    fix = "free some space" if error.errno == errno.ENOSPC else "fix the folder's permissions or choose another output_dir"
    return UserError(f"cannot write {path}: {cause}. Samples finished before are kept; {fix}, then run the same "
                     f"command again to resume")


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
                finished.setdefault(record[ID], record)
    return header, finished, torn


def has_records(output_dir: str | Path) -> bool:
    return any((Path(output_dir) / RECORD_DIR).glob("*.jsonl"))


def sort_rows(rows: Iterable[dict]) -> List[dict]:
    """The one order of records in every output: by split, set and id (whatever the processes or shards)."""
    return sorted(rows, key=lambda r: (r[SPLIT], r[SET], r[ID]))


def columns_to_records(columns: Dict[str, list]) -> List[dict]:
    """A batch's columns as one dict per sample (what a record file's lines hold)."""
    names = list(columns)
    return [{c: columns[c][i] for c in names} for i in range(len(columns[names[0]]))] if names else []


def records_to_columns(rows: List[dict]) -> Dict[str, list]:
    if not rows:
        return {}
    columns = list(rows[0])
    return {c: [r.get(c) for r in rows] for c in columns}


class RunLock:
    """``with RunLock(output_dir):`` one run at a time writes a folder's records and outputs.

    An advisory lock (``fcntl.flock``) on ``OUTPUT/records/.lock``, which names its holder (process id, host,
    start time); the system drops it when the holder ends, however it ends. A second holder is refused with
    ConfigError naming the first.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / RECORD_DIR / LOCK
        self._handle = None

    def __enter__(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as error:
            raise write_failure(self.path, error) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.path.parent.parent} is in use by another evaluation ({holder}): wait for it to "
                              f"end (then the same command resumes), or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the lock
            self._handle = None


@dataclass
class Work:
    """What an evaluation run has to do in ``output_dir``: the samples it covers (its shard of ``ids``), those
    an earlier run with the same fingerprint finished there (resume), and the header its record files carry."""

    header: dict
    ids: List[str]  # every sample of the evaluated sets, in their order
    wanted: List[int]  # indices into ids: this run's samples (a shard=i/n run: every n-th)
    todo: List[int]  # of wanted, those not finished yet
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
    return Work(header, ids, wanted, todo, torn)


class RecordSink:
    """Where one process's records go during the test loop: its record file (:class:`RecordWriter`) and memory.

    :meth:`gather` (every process calls it once the loop is done) brings every process's records of this run to
    rank 0, without a shared file system; :func:`collect` adds those an earlier run finished.
    """

    def __init__(self, output_dir: str | Path, header: dict):
        self.output_dir, self.header = Path(output_dir), header
        self.writer: Optional[RecordWriter] = None
        self.rows: List[dict] = []

    def open(self, rank: int) -> None:
        self.writer, self.rows = RecordWriter(self.output_dir, rank, self.header), []

    def append(self, records: Dict[str, list]) -> None:
        self.rows += self.writer.append(records)

    def gather(self) -> Optional[List[dict]]:
        """Close the file; every process's rows of this run on rank 0 (a list), None on the other ranks."""
        import torch.distributed as dist

        if self.writer is not None:
            self.writer.close()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.rows
        gathered: List[Optional[List[dict]]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.rows)
        return [row for rank_rows in gathered for row in rank_rows] if dist.get_rank() == 0 else None


def collect(output_dir: Path, work: Work, this_run: Sequence[dict] = ()) -> Dict[str, list]:
    """Every finished record of ``work``'s samples, as columns in :func:`sort_rows`'s order: what ``output_dir``
    holds under the run's fingerprint (earlier runs') and ``this_run`` (the rows :meth:`RecordSink.gather`
    brought to rank 0), one per sample id."""
    _, finished, _ = read_records([output_dir], work.header)
    for row in this_run:
        finished.setdefault(row[ID], row)
    return records_to_columns(sort_rows(finished[work.ids[i]] for i in work.wanted if work.ids[i] in finished))
