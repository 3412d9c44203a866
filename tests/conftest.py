import os
from pathlib import Path

# Small tensors: one thread per process is faster than two and keeps subprocess tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffguard_pl.config import DataConfig  # noqa: E402
from diffguard_pl.data import build_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints" / "digits"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def benchmark():
    """The default embedded benchmark, built once per test session."""
    return build_benchmark(DataConfig())
