"""Benchmarks (diffguard_pl/data/benchmark.py) and how they are built; the LightningDataModule that serves them
lives in :mod:`diffguard_pl.data.datamodule` (imported only where Lightning is used)."""

from diffguard_pl.data.benchmark import IND, OOD_LABEL, Benchmark, ImageSet, OODSet, preprocess, sample_seed
from diffguard_pl.data.build import build_benchmark, check_available

__all__ = [
    "IND",
    "OOD_LABEL",
    "Benchmark",
    "ImageSet",
    "OODSet",
    "build_benchmark",
    "check_available",
    "preprocess",
    "sample_seed",
]
