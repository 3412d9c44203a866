"""Host-device synchronisations of the pipeline on CUDA: they must not grow with the number of steps.

    python -m benchmarks.perf.sync_check [--batch-size 64] [--json FILE]

A synchronisation (a value read back to the host: ``.item()``, ``bool(tensor)``, a copy to the CPU, a
size that depends on device data) stops the host from queueing the next step's kernels until the device
has finished the current ones. The pipeline keeps its bookkeeping on the host and reads the denoiser's NaN
check once per run, so with a fixed depth (no adaptive early stop) the number of synchronisations of a batch
is the same at any depth. The script counts them with ``torch.cuda.set_sync_debug_mode("warn")`` for the
embedded models (classifier guidance with cutouts and per-step curves; classifier-free guidance with DSG) at
two depths and fails (exit 1) when the count grows with the depth. With AES on, the stop rule reads one
value per inversion step by design; that path is printed for information only.

Needs CUDA (on a CPU it says so and exits 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from diffguard_pl.api import load_preset
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.method.pipeline import DiffGuardPipeline

PATHS = {  # name: (preset, overrides, must stay constant)
    "gdm": ("digits_gdm", ["diffguard.aes.record_curves=true"], True),
    "classifier_free_dsg": ("digits_classifier_free", [], True),
    "gdm_aes": ("digits_gdm", ["diffguard.aes.enabled=true", "diffguard.aes.psnr=7.8"], False),
}


def count_syncs(pipe: DiffGuardPipeline, images: torch.Tensor, ids: list) -> int:
    """Synchronising CUDA operations during one pipeline call (after a warm-up call)."""
    pipe(images, ids)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe(images, ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--depths", default="4,8", help="two inversion depths to compare")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_check: CUDA is not available; nothing to count")
        return 0
    from diffguard_pl.data import build_benchmark

    depths = [int(d) for d in args.depths.split(",")]
    report, failed = {}, []
    for name, (preset, overrides, constant) in PATHS.items():
        counts = {}
        for depth in depths:
            cfg = load_preset(preset, *overrides, f"diffguard.depth={depth}", "diffguard.aes.min_depth=1")
            pipe = DiffGuardPipeline(load_diffusion(cfg.models.diffusion), load_classifier(cfg.models.classifier),
                                     cfg.diffguard).to("cuda")
            test = build_benchmark(cfg.data).test
            images, ids = test.images[: args.batch_size].cuda(), test.ids[: args.batch_size]
            counts[depth] = count_syncs(pipe, images, ids)
        grows = counts[depths[-1]] > counts[depths[0]]
        report[name] = {"syncs_by_depth": counts, "must_stay_constant": constant, "grows": grows}
        verdict = ("FAIL: grows with the depth" if grows and constant else
                   "grows with the depth (by design: the AES rule reads the stop decision)" if grows else "constant")
        print(f"{name}: synchronisations per batch of {len(ids)} at depth "
              + ", ".join(f"{d}: {c}" for d, c in counts.items()) + f" -> {verdict}", flush=True)
        if grows and constant:
            failed.append(name)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
