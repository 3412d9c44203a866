"""Train a classifier or a diffusion model on a benchmark.

    python train.py [--config conf/train_classifier.yaml] [key=value ...]
    python train.py --help                        # every key, its type, default and meaning

See conf/ for the presets.
"""

import sys
from pathlib import Path

from diffguard_pl.cli import run
from diffguard_pl.config import TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "conf" / "train_classifier.yaml"


def job(cfg):
    from diffguard_pl.jobs.train_job import train  # torch and Lightning load only once the config is valid

    train(cfg)


if __name__ == "__main__":
    sys.exit(run(TrainConfig, job, sys.argv[1:], str(DEFAULT_CONFIG), "train.py"))
