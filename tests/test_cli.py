"""The command line: --help without torch, print_config, and one clean error for every bad value.

Each bad value: exit code 2, a single ``error:`` line on stderr naming the key (and no traceback), and the
output folder exactly as it was (nothing lost, nothing half-written).
"""

import hashlib
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from diffguard_pl.config import DiffGuardConfig
from helpers.paths import ROOT

pytestmark = pytest.mark.subprocess


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("argv", [[], ["--config", "fashion_gdm"]], ids=["default", "preset"])
def test_help_lists_every_key_without_importing_torch(argv):
    probe = (f"import runpy, sys, io, contextlib; sys.argv = ['evaluate.py', *{argv!r}, '--help']\n"
             "out = io.StringIO()\n"
             "with contextlib.redirect_stdout(out):\n"
             "    try: runpy.run_path('evaluate.py', run_name='__main__')\n"
             "    except SystemExit: pass\n"
             "print('torch' in sys.modules, 'lightning' in sys.modules); print(out.getvalue())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    first, text = result.stdout.split("\n", 1)
    assert first == "False False", result.stderr
    assert "diffguard.guidance.scale (float, default " in text
    assert "data.eval_batch_size (int, default 64)" in text and "oracle (str, default none)" in text
    preset = OmegaConf.load(ROOT / "conf" / ("fashion_gdm.yaml" if argv else "digits_gdm.yaml"))
    ladder = preset.diffguard.get("ladder", DiffGuardConfig().ladder)
    assert f"diffguard.ladder (str, default {ladder}" in text and "symmetric (" in text
    assert f"diffguard.depth (int, default {preset.diffguard.depth} [schema {DiffGuardConfig().depth}])" in text


def test_help_into_a_reader_that_stops_early_ends_quietly():
    """``evaluate.py --help | head``: the reader is gone before the help is written; no traceback, exit code 0."""
    process = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=ROOT)
    process.stdout.close()
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""


def test_print_config_prints_the_resolved_config_and_stops(tmp_path):
    result = run("print_config=true", "diffguard.depth=7", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "depth: 7" in result.stdout and "num_steps: 50" in result.stdout
    assert not (tmp_path / "out").exists()


BAD = [
    (["diffguard.guidanc.scale=3"], "diffguard.guidanc"),
    (["data.resolution=abc"], "data.resolution"),
    (["diffguard.guidance.scale=inf"], "diffguard.guidance.scale=inf"),
    (["diffguard.guidance.scale=nan"], "diffguard.guidance.scale=nan"),
    (["diffguard.guidance.scale=-1"], "diffguard.guidance.scale=-1"),
    (["--config=conf/digits_classifier_free.yaml", "diffguard.guidance.classifier_free.omega=inf"],
     "diffguard.guidance.classifier_free.omega=inf"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0"),
    (["limit_per_set=0"], "limit_per_set=0"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["shard=2/2"], "shard='2/2'"),
    (["shard=half"], "shard='half'"),
    (["diffguard.depth=60"], "diffguard.depth=60"),
    (["oracle=true"], "oracle='True' is not allowed; choose one of"),
    (["--config", "fashion_gmd"], "did you mean fashion_gdm"),
    (["diffguard.clip_x0=true"], "diffguard.clip_x0"),
    (["data.resolution=32"], "data.resolution=32"),
    (["data.channels=3"], "data.channels=3"),
    (["models.classifier=/nonexistent/classifier"], "/nonexistent/classifier"),
    (["data.benchmark=fashion", "data.root=/nonexistent"], "/nonexistent"),
]


@pytest.mark.parametrize("argv, named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_value_gives_one_error_line_and_exit_code_2(tmp_path, argv, named):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": "results"}')  # an earlier run's output must survive
    before = snapshot(out)
    result = run(f"output_dir={out}", *argv)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr[-2000:]
    assert "resume" not in lines[0]  # resuming cannot help with any of these
    assert snapshot(out) == before


@pytest.mark.parametrize("make", ["file", "unwritable"])
def test_an_output_dir_that_cannot_be_written_fails_before_models_load(tmp_path, make):
    if make == "file":
        target = tmp_path / "a_file"
        target.write_text("not a folder")
    else:
        target = "/proc/diffguard_pl_cannot_write_here"
    result = run(f"output_dir={target}")  # the model files check out (configs only); the folder is checked next
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines()  # the classifier check's features: progress, before it
             if line.strip() and not line.startswith("classifier features of InD validation images")]
    assert len(lines) == 1 and "output_dir=" in lines[0], result.stderr
    assert "weights" not in result.stdout and "loading" not in result.stdout.lower(), result.stdout
