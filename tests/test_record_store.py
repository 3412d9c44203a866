"""The record store's faults: one writer at a time, a failed write said in one line, a damaged checkpoint named
before any work, and the end of a run reading back every record exactly."""

import errno
import os
import shutil

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig
from diffguard_pl.errors import ConfigError, DamagedCheckpointError, UserError
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.models import load_classifier
from diffguard_pl.models.loading import find_damaged, weights_of
from diffguard_pl.records.store import RecordSink, RecordWriter, RunLock, Work, collect, read_records

from helpers.configs import eval_argv
from helpers.paths import CHECKPOINTS


def test_a_second_writer_of_a_folder_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=rf"in use by another evaluation \(process {os.getpid()} on .*choose "
                                              r"another output_dir"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released when its holder ends
        pass


def test_evaluate_refuses_a_folder_another_run_holds(tmp_path, small_models, benchmark):
    cfg = config_lib.load(EvalConfig, eval_argv(tmp_path, small_models), None)
    with RunLock(tmp_path), pytest.raises(ConfigError, match="in use by another evaluation"):
        evaluate(cfg, benchmark)
    assert not list((tmp_path / "records").glob("*.jsonl"))  # refused before any work


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_what_was_written(tmp_path, monkeypatch):
    writer = RecordWriter(tmp_path, 0, {"fingerprint": "f"})
    writer.append({"id": ["a"], "set": ["ind"], "split": ["test"], "label": [0], "diffguard/l2": [1.0]})

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as caught:
        writer.append({"id": ["b"], "set": ["ind"], "split": ["test"], "label": [0], "diffguard/l2": [2.0]})
    message = str(caught.value)
    assert str(writer.path) in message and "the disk is full" in message and "resume" in message
    assert "\n" not in message
    monkeypatch.undo()
    writer.close()
    _, finished, _ = read_records([tmp_path])
    assert finished["a"]["diffguard/l2"] == 1.0


def test_an_undeclared_column_never_reaches_the_records(tmp_path):
    writer = RecordWriter(tmp_path, 0, {"fingerprint": "f"})
    with pytest.raises(ValueError, match="declared nowhere"):
        writer.append({"id": ["a"], "set": ["ind"], "split": ["test"], "label": [0], "my_new_score": [1.0]})


def test_a_damaged_checkpoint_is_named_with_its_file(tmp_path):
    folder = tmp_path / "classifier"
    shutil.copytree(CHECKPOINTS / "classifier", folder)
    assert find_damaged(folder) is None
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated, as by a full disk or an interrupted copy
    with pytest.raises(DamagedCheckpointError, match=rf"models.classifier=.*{weights.name} is damaged"):
        with weights_of("models.classifier", folder):
            load_classifier(folder)
    with pytest.raises(ZeroDivisionError):  # a failure of anything else goes on as it is
        with weights_of("models.classifier", CHECKPOINTS / "classifier"):
            raise ZeroDivisionError


def test_a_truncated_torch_archive_is_found(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    assert find_damaged(tmp_path) is None
    path.write_bytes(path.read_bytes()[:-200])
    assert find_damaged(tmp_path)[0] == path


def test_collect_returns_earlier_and_this_runs_records_once_each(tmp_path):
    header = {"fingerprint": "f"}
    earlier = RecordWriter(tmp_path, 0, header)
    earlier.append({"id": ["b"], "set": ["ind"], "split": ["test"], "label": [1], "diffguard/l2": [2.0]})
    earlier.close()
    sink = RecordSink(tmp_path, header)
    sink.open(0)
    sink.append({"id": ["a", "c"], "set": ["ind", "far"], "split": ["test", "test"], "label": [0, -1],
                 "diffguard/l2": [1.0, 3.0]})
    this_run = sink.gather()
    work = Work(header, ["a", "b", "c"], [0, 1, 2], [0, 2], 0)
    records = collect(tmp_path, work, this_run)
    assert records["id"] == ["c", "a", "b"]  # sorted by split, set, id
    assert records["diffguard/l2"] == [3.0, 1.0, 2.0]
