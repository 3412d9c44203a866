"""Benchmarks and the LightningDataModule that serves them."""

from diffguard_pl.data.benchmark import IND, OOD_LABEL, Benchmark, ImageSet, OODSet, preprocess, sample_seed
from diffguard_pl.data.datamodule import BenchmarkDataModule, build_benchmark

__all__ = [
    "IND",
    "OOD_LABEL",
    "Benchmark",
    "BenchmarkDataModule",
    "ImageSet",
    "OODSet",
    "build_benchmark",
    "preprocess",
    "sample_seed",
]
