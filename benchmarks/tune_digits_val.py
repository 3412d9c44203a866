"""Choose the embedded preset's DiffGuard settings on validation splits only.

Runs evaluate.py with split=val (InD val against each OOD set's val split)
over a small grid and prints near / far AUROC of every DiffGuard distance
and of the fused detector. Test splits are never read.

    python benchmarks/tune_digits_val.py [--config FILE] [--grid key=v1,v2 ...] [key=value ...]

``--grid`` replaces the default grid (depth x classifier-guidance scale of
conf/digits_gdm.yaml); extra overrides apply to every run.
"""

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = {
    "diffguard.depth": [15, 25, 35],
    "diffguard.guidance.scale": [3.0, 10.0, 30.0],
}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="preset to tune (default: evaluate.py's default)")
    parser.add_argument("--grid", action="append", default=None, help="key=v1,v2,... (repeatable)")
    args, extra = parser.parse_known_args(argv)
    grid = GRID if args.grid is None else {k: v.split(",") for k, v in (item.split("=", 1) for item in args.grid)}
    preset = [f"--config={args.config}"] if args.config else []
    tag = Path(args.config).stem if args.config else "default"
    rows = []
    for values in itertools.product(*grid.values()):
        overrides = [f"{k}={v}" for k, v in zip(grid, values)]
        out = ROOT / "outputs" / "tune" / tag / "_".join(f"{k.split('.')[-1]}{v}" for k, v in zip(grid, values))
        cmd = [sys.executable, str(ROOT / "evaluate.py"), *preset, "split=val", f"output_dir={out}",
               "trainer.enable_progress_bar=false", *overrides, *extra]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        results = json.loads((out / "results.json").read_text())
        for name, entry in results["detectors"].items():
            if name.startswith("diffguard"):
                rows.append((" ".join(overrides), name, entry["near"]["auroc"], entry["far"]["auroc"]))
    rows.sort(key=lambda r: -r[2])
    print(f"{'settings':55s} {'detector':22s} near AUROC  far AUROC")
    for settings, name, near, far in rows:
        print(f"{settings:55s} {name:22s} {100 * near:10.2f} {100 * far:10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
