"""Which samples an evaluation scores: limits by id hash, the sets of a split, a folder of images."""

from __future__ import annotations

from typing import List, Optional

from diffguard_pl.config import EvalConfig
from diffguard_pl.data.benchmark import Benchmark, ImageSet, sample_seed


def subset_by_id(image_set: ImageSet, limit: Optional[int], seed: int = 0) -> ImageSet:
    """At most ``limit`` samples of a set, chosen by the hash of their ids: the same samples whatever the
    set's order, the other sets or the number of processes (all with None)."""
    if limit is None or len(image_set) <= limit:
        return image_set
    order = sorted(range(len(image_set)), key=lambda i: sample_seed(image_set.ids[i], seed))
    return image_set.subset(sorted(order[:limit]))


def evaluation_sets(benchmark: Benchmark, limit: Optional[int], split: str = "test") -> List[ImageSet]:
    """InD validation (for the fused detectors' normalisation) and every set's ``split`` split, each limited
    to ``limit`` samples chosen by id hash."""
    if split == "val":
        sets = [benchmark.val] + [s.val for s in benchmark.ood.values()]
    else:
        sets = [benchmark.val, benchmark.test] + [s.test for s in benchmark.ood.values()]
    return [subset_by_id(s, limit) for s in sets if s is not None and len(s) > 0]


def folder_images(cfg: EvalConfig, benchmark: Benchmark) -> ImageSet:
    """The images of ``score_folder`` as one unlabelled set, preprocessed like the benchmark's. Every image was
    decoded before the models loaded (diffguard_pl/jobs/folder.py ``inspect_folder``); with data.on_error=skip
    they are decoded again here, by the same check, so the set leaves out exactly the files that report named."""
    from diffguard_pl.data.build import file_transform
    from diffguard_pl.data.file_benchmark import ReadOptions, folder_set
    from diffguard_pl.data.image_files import standard_transform

    data = cfg.data
    transform = (standard_transform("resize", data.resolution) if data.benchmark in ("digits", "fashion")
                 else file_transform(data))
    options = ReadOptions(transform=transform, channels=benchmark.channels, resolution=data.resolution,
                          convert_grayscale=data.allow_grayscale or benchmark.channels == 1,
                          on_error=data.on_error, verify_files=data.on_error == "skip", workers=data.decode_workers)
    return folder_set(cfg.score_folder, "folder", options)
