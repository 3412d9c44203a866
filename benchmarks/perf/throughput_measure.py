"""One path's images timed: the pipeline against the replay of its own model calls, and the FLOP floor.

Model time is the unavoidable cost: the time of *replaying*, with random inputs of the same shapes and nothing
else in between, exactly the model calls the pipeline made on the same images (recorded in a warm-up run):

- every denoiser call with the rows the pipeline actually batched in it (inverting + synthesising rows, with
  classifier-free guidance their unconditional twins, with an unguided reference the reference rows; with AES
  the counts vary from call to call);
- classifier guidance: per synthesis step one classifier forward + backward (gradient with respect to its
  input) over the N_syn x K cutout crops at the classifier's input size;
- DSG: Grad-CAM, one forward + backward per image (``diffguard_pl.method.cam.grad_cam``);
- latent models: the autoencoder's encode of the input and decode of the synthesis (and reference);
- the classifier forwards the method itself needs: the input's label and, for the classifier distances
  (``logit_l1``, ``feature_cos``), the synthesis (and reference).

That is the issue's ``UNet evaluations x bare UNet time + guidance steps x classifier time`` with the sums
taken over the actual row counts, plus the Grad-CAM, autoencoder and label terms. Everything else (DDIM
arithmetic, bookkeeping, cutout resampling, per-step PSNR / SSIM curves, distances) is overhead. The models
run under the same ``diffguard.runtime`` settings in both (autocast, channels_last, compile, inference mode,
cudnn.benchmark). After one warm-up of each, ``--repeats`` rounds pair them batch by batch: every batch goes
through the pipeline and right after it the replay of that batch's model calls, so slow drifts of a shared
machine's speed hit both alike. The ratio is total pipeline time / total replay time over the rounds
(``ratio_median``: the median of the per-round ratios; ``ratio_fastest``: fastest round over fastest round);
images/s come from the fastest pipeline round. The per-step curves
(``diffguard.aes.record_curves``) stay as configured (on by default, as in ``evaluate.py``); pass
``diffguard.aes.record_curves=false`` to measure without them. For a cross-check the script also prints
``ratio_formula``: pipeline time over (UNet evaluations x bare per-row time at the evaluation batch size +
guidance steps x classifier forward + backward per image at that batch size + Grad-CAM and autoencoder
encode / decode per image at that batch size); it ignores that synthesis calls batch 2N or 3N rows.

The floor. The model calls' arithmetic is counted with ``torch.utils.flop_counter`` (convolutions, matrix
products and attention, forward and backward; each distinct call shape counted once and multiplied by its
count), and the device's dense matrix-product rate in the compute dtype (float32, on CUDA with TF32 allowed as
cuDNN convolutions use it by default; or the autocast dtype) is measured in the same run (``--no-floor``
skips both). The script prints GFLOP per image, the rate the model replay reaches as a fraction of that
matrix-product rate, and ``floor images/s`` = matrix-product rate / FLOP per image: the speed of these
models if every FLOP ran at the dense matrix-product rate. It is an estimate of the hardware's limit, not a
strict bound: convolution kernels can beat the matrix-product rate by some 10-20% (fractions above 100%
happen), while normalisations, activations and the DDIM arithmetic are memory-bound and count no FLOPs.
"""

from __future__ import annotations

import statistics
import time
from typing import List, Optional

import torch

from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.profiling.machine import peak_mb, reset_peak, sync
from diffguard_pl.profiling.replay import Recorder, Replay


def run_pipeline(pipe: DiffGuardPipeline, images: torch.Tensor, ids: List[str], batch: int) -> dict:
    """The pipeline over ``images`` in batches, untimed (the quick warm-up); UNet evaluations and depth per image."""
    evals, depths = [], []
    for i in range(0, len(images), batch):
        out = pipe(images[i : i + batch], ids[i : i + batch])
        evals.append(out["unet_evals"].float())
        depths.append(out["depth"].float())
    return {"unet_evals_per_image": float(torch.cat(evals).mean()), "mean_depth": float(torch.cat(depths).mean())}


def measure(pipe: DiffGuardPipeline, images: torch.Tensor, ids: List[str], batch: int, repeats: int,
            device: torch.device, breakdown: bool = True, quick_pipe: Optional[DiffGuardPipeline] = None,
            peak_rate: Optional[float] = None) -> dict:
    """Warm up, then ``repeats`` rounds of paired passes; see the module docstring.

    In a round every batch goes through the pipeline and, right after it, the replay of that batch's model
    calls, so slow drifts of a shared machine's speed hit both alike. ``quick_pipe`` (a pipeline with the
    same models and a depth of 2): a short warm-up with the same shapes instead of a whole untimed pass; the
    model calls are then recorded during the first timed round (its replays run after each batch, as always).
    """
    images = images.to(device)
    n = len(images)
    bounds = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    recorder = Recorder(pipe)
    replays: List[Optional[Replay]] = [None] * len(bounds)
    stats: dict = {}

    def pipeline_batch(b: int, record: bool) -> dict:
        lo, hi = bounds[b]
        if not record:
            return pipe(images[lo:hi], ids[lo:hi])
        first = len(recorder.events)
        with recorder:
            out = pipe(images[lo:hi], ids[lo:hi])
        replays[b] = Replay(pipe, recorder.events[first:], seed=b)  # its inputs are drawn outside the timing
        return out

    def collect(outputs: List[dict]) -> dict:
        evals = torch.cat([o["unet_evals"].float() for o in outputs])
        depths = torch.cat([o["depth"].float() for o in outputs])
        return {"unet_evals_per_image": float(evals.mean()), "mean_depth": float(depths.mean())}

    parts = {}
    if quick_pipe is None:  # warm-up: one untimed pass of each, recording the model calls
        stats = collect([pipeline_batch(b, record=True) for b in range(len(bounds))])
        sync(device)
        for replay in replays:
            replay.prepare()
        parts = Replay(pipe, recorder.events).breakdown() if breakdown else {}
        for replay in replays:
            replay()
        sync(device)
    else:
        run_pipeline(quick_pipe, images[:batch], ids[:batch], batch)
        sync(device)
    pipe_times, model_times, peak = [], [], 0.0
    for _ in range(repeats):
        record = replays[0] is None
        reset_peak(device)
        pipe_total, model_total, outputs = 0.0, 0.0, []
        for b in range(len(bounds)):
            sync(device)
            start = time.perf_counter()
            out = pipeline_batch(b, record)
            sync(device)
            pipe_total += time.perf_counter() - start
            outputs.append(out)
            replays[b].prepare()
            start = time.perf_counter()
            replays[b]()
            sync(device)
            model_total += time.perf_counter() - start
        if record:
            stats = collect(outputs)
        peak = max(peak, peak_mb(device))
        pipe_times.append(pipe_total)
        model_times.append(model_total)
    events = recorder.events
    guide_rows = sum(e[1][0] for e in events if e[0] == "guide")
    crops = max(pipe.cfg.guidance.cutout.num, 1)
    unet_rows = sum(e[1][0] for e in events if e[0] == "unet")
    result = {
        "images": n,
        "batch_size": batch,
        "unet_evals_per_image": stats["unet_evals_per_image"],
        "unet_rows_per_image_replayed": unet_rows / n,
        "guidance_steps_per_image": guide_rows / crops / n if pipe.cfg.guidance.mode == "classifier" else 0.0,
        "mean_depth": stats["mean_depth"],
        "unet_calls": sum(1 for e in events if e[0] == "unet"),
        "pipeline_seconds": min(pipe_times),
        "model_seconds": min(model_times),
        "pipeline_seconds_all": pipe_times,
        "model_seconds_all": model_times,
        "images_per_second": n / min(pipe_times),
        "seconds_per_image": min(pipe_times) / n,
        "model_seconds_per_image": min(model_times) / n,
        "overhead_ratio": sum(pipe_times) / sum(model_times),
        "ratio_median": statistics.median(p / m for p, m in zip(pipe_times, model_times)),
        "ratio_fastest": min(pipe_times) / min(model_times),
        "peak_memory_mb": peak,
        "model_breakdown_seconds": parts,
    }
    if peak_rate:
        flops = Replay(pipe, events).flops()
        result["model_gflop_per_image"] = flops / n / 1e9
        result["model_gflops_per_second"] = flops / min(model_times) / 1e9
        result["fraction_of_matmul_rate"] = flops / min(model_times) / peak_rate
        result["floor_images_per_second"] = peak_rate / (flops / n)
        result["pipeline_fraction_of_floor"] = result["images_per_second"] / result["floor_images_per_second"]
    return result
