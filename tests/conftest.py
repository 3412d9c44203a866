import os
from pathlib import Path

import pytest
import torch

from diffguard_pl.config import DataConfig
from diffguard_pl.data import build_benchmark

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints" / "digits"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def benchmark():
    """The default embedded benchmark, built once per test session."""
    return build_benchmark(DataConfig())
