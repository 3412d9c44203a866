"""Evaluate DiffGuard and the classifier baselines on a benchmark.

    python evaluate.py [--config conf/digits_gdm.yaml] [key=value ...]
    python evaluate.py --help                     # every key, its type, default and meaning

With no arguments: the embedded Digits-OOD benchmark with the committed checkpoints.
"""

import sys
from pathlib import Path

from diffguard_pl.cli import run
from diffguard_pl.config import EvalConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "conf" / "digits_gdm.yaml"


def job(cfg):
    from diffguard_pl.jobs.eval_job import evaluate  # torch and Lightning load only once the config is valid

    evaluate(cfg)


if __name__ == "__main__":
    sys.exit(run(EvalConfig, job, sys.argv[1:], str(DEFAULT_CONFIG), "evaluate.py"))
