"""Images of a benchmark's test sets saved as PNG files: a folder to try ``score_folder`` on.

    python -m diffguard_pl.jobs.sample_images --set ind --set mnist --count 10 my_images [--config fashion_gdm]
    python evaluate.py --config fashion_gdm score_folder=my_images

``--set`` names the InD test set (``ind``) or an OOD set of the preset's benchmark (its test split); ``--count``
images of each are taken by id hash (the same images on every machine) and saved as ``<set>_<id>.png`` at the
benchmark's resolution, so the folder's verdict can be checked against where each image came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Sequence

from diffguard_pl.data.benchmark import IND


def file_name(set_name: str, sample_id: str) -> str:
    """``<set>_<id>.png`` with the id's path separators made safe for one file name."""
    return f"{set_name}_{sample_id.replace('/', '-')}.png"


def save_images(benchmark, sets: Sequence[str], count: int, folder: str | Path) -> List[Path]:
    """Save ``count`` test images (by id hash) of each of ``sets`` to ``folder``; returns the files written.
    ValueError naming the choices for a set the benchmark does not have."""
    from PIL import Image

    from diffguard_pl.data.selection import subset_by_id

    known = [IND, *benchmark.ood]
    unknown = [s for s in sets if s not in known]
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: the benchmark {benchmark.name} has the sets {', '.join(known)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sets:
        chosen = subset_by_id(benchmark.test if name == IND else benchmark.ood[name].test, count)
        for i in range(len(chosen)):
            sample = chosen[i]
            pixels = (sample["image"].clamp(0, 1) * 255).round().byte()
            array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
            path = folder / file_name(name, sample["id"])
            Image.fromarray(array).save(path)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="where the PNG files go (made if missing)")
    parser.add_argument("--config", default="fashion_gdm", help="the preset whose benchmark the images come from")
    parser.add_argument("--set", dest="sets", action="append", help="ind, or an OOD set's name; repeatable")
    parser.add_argument("--count", type=int, default=10, help="images per set, chosen by id hash")
    args = parser.parse_args(argv)
    from diffguard_pl.config import EvalConfig
    from diffguard_pl.config_loading import load
    from diffguard_pl.data import build_benchmark
    from diffguard_pl.errors import UserError

    try:
        cfg = load(EvalConfig, ["--config", args.config], None)
        written = save_images(build_benchmark(cfg.data), args.sets or [IND], args.count, args.folder)
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"saved {len(written)} images to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
