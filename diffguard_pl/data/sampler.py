"""A sampler that gives every sample to exactly one process, without padding.

Lightning's default ``DistributedSampler`` pads the dataset by repeating
samples so that every rank gets the same count; for evaluation that repeats
work and, unless removed, counts samples twice. Rank r of W takes indices
r, r + W, r + 2W, ...; ranks may get uneven counts. A rank that would get
none (fewer samples than processes) gets one repeated sample instead, because
Lightning skips the loop, and with it the final gathering, on a rank with no
batches; the evaluator keeps one record per sample id, so the repeat is not
counted.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch.distributed as dist
from torch.utils.data import Sampler


class DistributedEvalSampler(Sampler[int]):
    def __init__(self, length: int, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.length, self._rank, self._world_size = length, rank, world_size

    def _indices(self) -> range:
        # Read the process group lazily: Lightning initialises it after the loader is built.
        initialized = dist.is_available() and dist.is_initialized()
        rank = self._rank if self._rank is not None else (dist.get_rank() if initialized else 0)
        world = self._world_size if self._world_size is not None else (dist.get_world_size() if initialized else 1)
        if rank >= self.length > 0:
            return range(rank % self.length, rank % self.length + 1)
        return range(rank, self.length, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
