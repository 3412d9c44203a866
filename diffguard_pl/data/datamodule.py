"""LightningDataModule over a :class:`Benchmark`: the one interface every data source uses."""

from __future__ import annotations

from typing import Optional

import lightning as L
from torch.utils.data import ConcatDataset, DataLoader

from diffguard_pl.config import DataConfig
from diffguard_pl.data.benchmark import Benchmark
from diffguard_pl.data.build import build_benchmark


class BenchmarkDataModule(L.LightningDataModule):
    """Serves InD train / val for training and InD test (plus OOD test sets) for testing.

    ``test_ood=False`` serves only the InD test split (classifier accuracy);
    ``test_ood=True`` appends every OOD set's test split (OOD evaluation).
    """

    def __init__(self, cfg: DataConfig, test_ood: bool = False, benchmark: Optional[Benchmark] = None):
        super().__init__()
        self.cfg = cfg
        self.test_ood = test_ood
        self.benchmark = benchmark

    def setup(self, stage: Optional[str] = None) -> None:
        if self.benchmark is None:
            self.benchmark = build_benchmark(self.cfg)

    def _loader(self, dataset, shuffle: bool, batch_size: int, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.benchmark.train) > self.cfg.batch_size
        return self._loader(self.benchmark.train, True, self.cfg.batch_size, drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.benchmark.val, False, self.cfg.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        sets = [self.benchmark.test]
        if self.test_ood:
            sets += [s.test for s in self.benchmark.ood.values()]
        return self._loader(ConcatDataset(sets), False, self.cfg.eval_batch_size)
