"""Throughput of DiffGuard against the cost of its model evaluations: how close the pipeline runs to the floor.

    python -m benchmarks.perf.throughput                              # embedded models, CPU (or the GPU)
    python -m benchmarks.perf.throughput --device cuda --batch-size 256 diffguard.runtime.autocast=bf16
    python -m benchmarks.perf.throughput --paper-scale --device cuda --images 16 diffguard.runtime.autocast=bf16 \\
        diffguard.runtime.channels_last=true                          # ADM-256 + ResNet-50, DiT-XL/2 + SD-VAE
    python -m benchmarks.perf.throughput --compare OUT_FP32 OUT_BF16   # two evaluate.py runs side by side

This command line dispatches to the script's three jobs:

- timing the paths of the embedded presets, each pipeline run against a replay of its own model calls, with the
  FLOP floor and batch-size scaling (benchmarks.perf.throughput_timing, measuring with
  benchmarks.perf.throughput_measure);
- the same on the paper-scale architectures with random weights, ``--paper-scale``
  (benchmarks.perf.throughput_paper);
- ``--compare OUT_A OUT_B``: the AUROCs and scores of two evaluate.py output folders
  (benchmarks.perf.throughput_compare).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from benchmarks.perf import throughput_timing
from benchmarks.perf.throughput_compare import compare
from benchmarks.perf.throughput_paper import PaperSuite

COMMAND = "python -m benchmarks.perf.throughput"


def build_parser() -> argparse.ArgumentParser:
    """The command line of all three jobs."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda if present)")
    parser.add_argument("--paper-scale", action="store_true", help="ADM-256 + ResNet-50 and DiT-XL/2 + SD-VAE, random")
    parser.add_argument("--tiny-arch", action="store_true", help="with --paper-scale: shrunken architectures (tests)")
    parser.add_argument("--paths", default="gdm,gdm_aes,classifier_free_dsg",
                        help="comma-separated: gdm, gdm_aes, classifier_free_dsg")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="evaluation batch size (default: 64 on a CPU, else the preset's data.eval_batch_size)")
    parser.add_argument("--images", type=int, default=None, help="images per measured pass (default: the batch size)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2; 1 with --paper-scale)")
    parser.add_argument("--scaling", default=None, help="batch sizes for the scaling table (default 1,8,64; "
                        "none with --paper-scale); none: no scaling table")
    parser.add_argument("--scaling-path", default="gdm")
    parser.add_argument("--scaling-images", type=int, default=8, help="at least this many images per scaling point")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-model-group replay")
    parser.add_argument("--no-floor", action="store_true", help="skip the FLOP count and the matmul-rate floor")
    parser.add_argument("--warmup", choices=["full", "quick"], default=None,
                        help="full: one untimed pass (default); quick: a depth-2 pass with the same shapes, the "
                        "model calls recorded in the first timed pass (default with --paper-scale)")
    parser.add_argument("--compare", nargs=2, metavar=("OUT_A", "OUT_B"), default=None,
                        help="only compare two evaluate.py output folders (e.g. fp32 and bf16): AUROC, FPR@95, scores")
    parser.add_argument("--json", default=None, help="write the results to this file (after every path)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides for every path, e.g. diffguard.runtime.autocast=bf16")
    return parser


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the job the command line asks for; its report (also written to ``--json`` when given)."""
    args = build_parser().parse_intermixed_args(argv)
    if args.compare:
        return compare(*args.compare, json_path=args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    suite = PaperSuite(device, args.tiny_arch) if args.paper_scale else throughput_timing.EmbeddedSuite()
    command = " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])])
    return throughput_timing.run(args, device, suite, command)


if __name__ == "__main__":
    main()
