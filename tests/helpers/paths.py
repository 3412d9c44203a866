"""Where the project and its committed checkpoints are."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "checkpoints" / "digits"
