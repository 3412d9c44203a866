"""Train a classifier or a diffusion model on a benchmark.

    python train.py [--config conf/train_classifier.yaml] [key=value ...]

See conf/ for the presets and diffguard_pl/config.py (TrainConfig) for every key.
"""

import sys
from pathlib import Path

from diffguard_pl.cli import run
from diffguard_pl.config import TrainConfig
from diffguard_pl.training import train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "conf" / "train_classifier.yaml"

if __name__ == "__main__":
    sys.exit(run(TrainConfig, train, sys.argv[1:], str(DEFAULT_CONFIG)))
