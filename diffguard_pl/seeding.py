"""Per-sample randomness: every random draw that touches a sample (cutout crops, oracle labels, training noise,
splits) is seeded from the sample's stable id, never from its batch position or process rank, so the draws do
not depend on batch size, sample order or the number of processes (and results only by rounding)."""

from __future__ import annotations

import hashlib


def sample_seed(sample_id: str, base_seed: int = 0) -> int:
    """A 63-bit seed that depends only on the sample id and a base seed."""
    digest = hashlib.sha256(f"{base_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
