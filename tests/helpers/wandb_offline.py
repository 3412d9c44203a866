"""Reading back what W&B wrote offline: the records of a run's transaction log and the tables it keeps as files."""

import json
import struct


def offline_records(run_dir):
    """Every protobuf ``Record`` of an offline run's transaction log ``run-*.wandb``, in order: a 7-byte header,
    then 32 KiB blocks of chunks, each behind a 7-byte header (CRC-32C: 4 bytes, length: 2 bytes little-endian,
    type: 1 full, 2 first, 3 middle, 4 last), as LevelDB's log; a chunk or a chunk sequence holds one record."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    data, block, position, pieces = log.read_bytes(), 32768, 7, []
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if room < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            position += room
            continue
        pieces.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def records_of(run_dir, kind):
    """The records of one type (``run``, ``summary``, ``artifact``, ...) of an offline run, their payloads."""
    return [getattr(r, kind) for r in offline_records(run_dir) if r.WhichOneof("record_type") == kind]


def offline_summary(run_dir):
    """The run summary W&B wrote offline, ``{key: value}`` (the last value of each top-level key)."""
    summary = {}
    for record in records_of(run_dir, "summary"):
        for item in record.update:  # a flat key, or a path into a nested value
            if item.key or len(item.nested_key) == 1:
                summary[item.key or item.nested_key[0]] = json.loads(item.value_json)
    return summary


def media_table(run_dir, stem):
    """A wandb.Table logged under ``stem`` (``folder/name``), as the offline run keeps it in files/media/table:
    its rows as dicts."""
    (path,) = (run_dir / "files" / "media" / "table").glob(f"{stem}_[0-9]*.table.json")
    table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]
