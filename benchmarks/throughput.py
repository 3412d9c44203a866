"""Throughput of DiffGuard against the cost of its model evaluations: how close the pipeline runs to the floor.

    python benchmarks/throughput.py                                   # embedded models, CPU (or the GPU)
    python benchmarks/throughput.py --device cuda --batch-size 256 diffguard.runtime.autocast=bf16
    python benchmarks/throughput.py --paper-scale --device cuda --images 16 diffguard.runtime.autocast=bf16 \\
        diffguard.runtime.channels_last=true                          # ADM-256 + ResNet-50, DiT-XL/2 + SD-VAE

In one run on one device, for each path (``--paths``):

- ``gdm``: classifier guidance (clean grad, cutout), AES off (``conf/digits_gdm.yaml``);
- ``gdm_aes``: the same with adaptive early stop (PSNR threshold 7.80 dB, calibrated on InD validation);
- ``classifier_free_dsg``: classifier-free guidance with DSG (``conf/digits_classifier_free.yaml``: the
  class-conditional model, Grad-CAM masks),

it measures the bare denoiser forward at the evaluation batch size, the classifier's forward + backward over
the configured cutout crops of that batch, and the whole pipeline (``DiffGuardPipeline.__call__``:
classification, Grad-CAM, encoding, inversion, guided synthesis, decoding, distances) per image, and prints
UNet (denoiser) evaluations per image, images/s, peak memory and

    overhead ratio = pipeline time / model time.

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

Batch-size scaling (``--scaling 1,8,64``): images/s of the ``--scaling-path`` at each batch size (at least
``--scaling-images`` images each), with its overhead ratio.

``--paper-scale`` builds the paper's architectures with random weights (no checkpoints needed): the ADM-256
unconditional UNet (guided-diffusion's 256x256_diffusion_uncond flags through ``diffguard_pl.models.convert``'s
config mapping) with timm's ResNet-50 at 224 px for the GDM paths, settings of ``conf/imagenet_gdm.yaml``
(100 spaced steps, depth 90, 8 cutouts, scale 3, unguided reference; ``gdm`` without AES, ``gdm_aes`` with
the released thresholds); DiT-XL/2-256 with the Stable Diffusion autoencoder and ResNet-50 (Grad-CAM on
layer4) for ``classifier_free_dsg``, settings of ``conf/imagenet_ldm.yaml`` (25 steps, omega 10). DISTS is replaced by
``l2`` (score and AES) when its weights are not in the torch hub cache (printed). Random weights make AES
stop at meaningless depths: the ``gdm`` path (fixed depth 90) is the released-settings measurement.
``--tiny-arch`` shrinks these architectures (same code paths) to test the script on a CPU.

Results go to stdout and, with ``--json FILE``, to a JSON file rewritten after every path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffguard_pl import config as config_lib  # noqa: E402
from diffguard_pl.config import EvalConfig  # noqa: E402
from diffguard_pl.method.pipeline import DiffGuardPipeline  # noqa: E402
from diffguard_pl.profiling.machine import COMPUTE_DTYPES, matmul_rate, peak_mb, reset_peak, sync  # noqa: E402
from diffguard_pl.profiling.replay import Recorder, Replay, bare_model_times  # noqa: E402

EMBEDDED_PATHS = {
    "gdm": ("conf/digits_gdm.yaml", []),
    "gdm_aes": ("conf/digits_gdm.yaml", ["diffguard.aes.enabled=true", "diffguard.aes.psnr=7.8"]),
    "classifier_free_dsg": ("conf/digits_classifier_free.yaml", []),
}
PAPER_PATHS = {
    "gdm": ("conf/imagenet_gdm.yaml", ["diffguard.aes.enabled=false"]),
    "gdm_aes": ("conf/imagenet_gdm.yaml", []),
    "classifier_free_dsg": ("conf/imagenet_ldm.yaml", []),
}
DESCRIPTIONS = {
    "gdm": "classifier guidance + cutout, AES off",
    "gdm_aes": "classifier guidance + cutout, AES on",
    "classifier_free_dsg": "classifier-free guidance + DSG",
}
ADM256_FLAGS = dict(  # guided-diffusion's 256x256_diffusion_uncond.pt
    attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, image_size=256, learn_sigma=True,
    noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
    use_fp16=False, use_scale_shift_norm=True,
)
TINY_ADM_FLAGS = dict(ADM256_FLAGS, image_size=32, num_channels=32, num_head_channels=16, num_res_blocks=1,
                      attention_resolutions="8,4")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------- models and data


def load_eval_config(preset: str, overrides: List[str]) -> EvalConfig:
    return config_lib.to_object(config_lib.compose(EvalConfig, [ROOT / preset], overrides))


def paper_overrides(preset: str, notes: List[str]) -> List[str]:
    """DISTS -> l2 when its weights are absent (score, distances, AES)."""
    from diffguard_pl.method.scores import check_perceptual_files

    if "imagenet_gdm" not in preset:
        return []
    try:
        check_perceptual_files(["dists"])
        return []
    except FileNotFoundError:
        note = "DISTS weights not in the torch hub cache: score dists -> l2, AES uses PSNR only"
        if note not in notes:
            notes.append(note)
        return ["diffguard.score=l2", "diffguard.distances=[l2,ssim,logit_l1,feature_cos]", "diffguard.aes.dists=null"]


class Models:
    """The models of each path, built once and shared by the paths that use them."""

    def __init__(self, paper: bool, tiny: bool, device: torch.device):
        self.paper, self.tiny, self.device = paper, tiny, device
        self._cache: dict = {}

    def _keep(self, key: str, build):
        if key not in self._cache:
            if self.paper:  # paper-scale models are large: keep only the ones of the current path
                self._cache = {k: v for k, v in self._cache.items() if k == "classifier"}
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                torch.manual_seed(0)
                self._cache[key] = build().to(self.device)  # random weights, built on the CPU
            else:
                self._cache[key] = build()
        return self._cache[key]

    def get(self, path: str, cfg: EvalConfig):
        from diffguard_pl.models import load_classifier, load_diffusion

        if not self.paper:
            classifier = self._keep(f"classifier:{cfg.models.classifier}",
                                    lambda: load_classifier(cfg.models.classifier))
            diffusion = self._keep(f"diffusion:{cfg.models.diffusion}", lambda: load_diffusion(cfg.models.diffusion))
            return diffusion, classifier.eval()
        classifier = self._keep("classifier", self._resnet50)
        latent = path == "classifier_free_dsg"
        diffusion = self._keep("dit" if latent else "adm", self._dit if latent else self._adm)
        return diffusion, classifier

    def _resnet50(self):
        from diffguard_pl.models import ClassifierSpec, build_classifier

        size = 32 if self.tiny else 224
        return build_classifier(ClassifierSpec("resnet50", 1000, 3, size, IMAGENET_MEAN, IMAGENET_STD)).eval()

    def _adm(self):
        from diffusers import UNet2DModel

        from diffguard_pl.models.convert import adm_config_from_flags, adm_scheduler, diffusers_unet_config
        from diffguard_pl.models import DiffusionModel

        flags = TINY_ADM_FLAGS if self.tiny else ADM256_FLAGS
        unet = UNet2DModel(**diffusers_unet_config(adm_config_from_flags(flags))).eval()
        scheduler = adm_scheduler(1000, "linear", learn_sigma=True)
        return DiffusionModel(unet, scheduler.alphas_cumprod.double().cpu())

    def _dit(self):
        from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

        from diffguard_pl.models import DiffusionModel
        from diffguard_pl.models.builders import dit_xl2, sd_autoencoder

        if self.tiny:
            dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                                layers_per_block=1, latent_channels=4, sample_size=32, scaling_factor=0.18215)
        else:
            dit, vae = dit_xl2(), sd_autoencoder()
        alphas = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
        return DiffusionModel(dit.eval(), alphas.cpu(), 1000, 1000, vae.eval())


_BENCHMARKS: dict = {}


def embedded_images(cfg: EvalConfig, count: int):
    """``count`` test images, InD and every OOD set interleaved (AES stops them at different depths)."""
    from diffguard_pl.data import build_benchmark

    key = repr(cfg.data)
    if key not in _BENCHMARKS:
        _BENCHMARKS[key] = build_benchmark(cfg.data)
    benchmark = _BENCHMARKS[key]
    sets = [benchmark.test] + [s.test for s in benchmark.ood.values()]
    order = [(s, i) for i in range(max(len(s) for s in sets)) for s in sets if i < len(s)]
    if count > len(order):
        raise SystemExit(f"--images {count}: the embedded test sets hold {len(order)} images")
    chosen = order[:count]
    return torch.stack([s.images[i] for s, i in chosen]), [s.ids[i] for s, i in chosen]


def paper_images(count: int, size: int):
    """Smooth random RGB images in [0, 1] (content does not change the cost at fixed depth)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, max(2, size // 16), max(2, size // 16), generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1), [f"random/{i:05d}" for i in range(count)]


# --------------------------------------------------------------------------- measuring


def run_pipeline(pipe: DiffGuardPipeline, images: torch.Tensor, ids: List[str], batch: int) -> dict:
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


def compare_results(dir_a: str, dir_b: str) -> dict:
    """AUROC / FPR@95 of two evaluate.py runs of the same benchmark (e.g. fp32 and bf16) and their score gaps."""
    import csv

    def load(folder):
        results = json.loads((Path(folder) / "results.json").read_text())
        with open(Path(folder) / "scores.csv", newline="") as handle:
            rows = {row["id"]: row for row in csv.DictReader(handle)}
        return results, rows

    (res_a, rows_a), (res_b, rows_b) = load(dir_a), load(dir_b)
    report: dict = {"a": str(dir_a), "b": str(dir_b), "detectors": {}, "scores": {}}
    print(f"{'detector':26s} {'near AUROC a / b':>18s} {'far AUROC a / b':>18s} {'near FPR@95 classic a / b':>26s}")
    for name, entry in res_a["detectors"].items():
        if name not in res_b["detectors"]:
            continue
        other = res_b["detectors"][name]
        values = {f"{g}_{k}": (entry[g].get(k), other[g].get(k)) for g in ("near", "far")
                  for k in ("auroc", "fpr95_classic", "fpr95_openood")}
        report["detectors"][name] = values
        if name.startswith("diffguard") or name in ("msp", "ebo"):
            fmt = lambda pair: f"{100 * pair[0]:.2f} / {100 * pair[1]:.2f}" if None not in pair else "-"
            print(f"{name:26s} {fmt(values['near_auroc']):>18s} {fmt(values['far_auroc']):>18s} "
                  f"{fmt(values['near_fpr95_classic']):>26s}")
    common = sorted(set(rows_a) & set(rows_b))
    columns = [c for c in next(iter(rows_a.values())) if c.startswith("diffguard/")]
    for column in columns:
        a = torch.tensor([float(rows_a[i][column]) for i in common], dtype=torch.float64)
        b = torch.tensor([float(rows_b[i][column]) for i in common], dtype=torch.float64)
        rel = (a - b).abs() / a.abs().clamp_min(1e-12)
        ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
        report["scores"][column] = {"max_abs": float((a - b).abs().max()), "median_rel": float(rel.median()),
                                    "spearman": float(torch.corrcoef(ranks)[0, 1])}
    same_pred = sum(rows_a[i]["pred"] == rows_b[i]["pred"] for i in common)
    report["samples"], report["same_prediction"] = len(common), same_pred
    report["throughput"] = {"a": res_a.get("throughput"), "b": res_b.get("throughput")}
    print(f"{len(common)} samples, same prediction for {same_pred}; score gaps (median relative, Spearman): "
          + ", ".join(f"{c.split('/')[1]} {v['median_rel']:.2e} {v['spearman']:.4f}"
                      for c, v in report["scores"].items()))
    return report


def describe_runtime(cfg) -> str:
    r = cfg.diffguard.runtime
    return (f"autocast={r.autocast} channels_last={r.channels_last} compile={r.compile} "
            f"cudnn_benchmark={r.cudnn_benchmark} inference_mode={r.inference_mode}")


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    args = parser.parse_intermixed_args(argv)
    if args.compare:
        report = compare_results(*args.compare)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))
        return report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    paths_table = PAPER_PATHS if args.paper_scale else EMBEDDED_PATHS
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in paths_table]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {list(paths_table)}")
    repeats = args.repeats or (1 if args.paper_scale else 2)
    scaling = args.scaling if args.scaling is not None else ("" if args.paper_scale else "1,8,64")
    scaling = [] if scaling.strip().lower() == "none" else [int(b) for b in scaling.split(",") if b.strip()]
    notes: List[str] = []
    models = Models(args.paper_scale, args.tiny_arch, device)
    report = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "paper_scale": args.paper_scale,
        "tiny_arch": args.tiny_arch,
        "overrides": list(args.overrides),
        "command": " ".join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "notes": notes,
        "paths": {},
        "scaling": {},
    }
    if device.type == "cpu":
        report["load_average"] = os.getloadavg()

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))

    quick = args.warmup == "quick" or (args.warmup is None and args.paper_scale)

    def setup(path: str, batch_override: Optional[int]):
        preset, extra = paths_table[path]
        overrides = extra + (paper_overrides(preset, notes) if args.paper_scale else []) + list(args.overrides)
        cfg = load_eval_config(preset, overrides)
        diffusion, classifier = models.get(path, cfg)
        pipe = DiffGuardPipeline(diffusion, classifier, cfg.diffguard).to(device)
        quick_pipe = None
        if quick:
            short = load_eval_config(preset, overrides + [f"diffguard.depth={min(2, cfg.diffguard.depth)}",
                                                          "diffguard.aes.min_depth=1"])
            quick_pipe = DiffGuardPipeline(diffusion, classifier, short.diffguard).to(device)
        default_batch = 64 if device.type == "cpu" else cfg.data.eval_batch_size
        batch = batch_override or args.batch_size or min(default_batch, args.images or default_batch)
        return cfg, pipe, batch, quick_pipe

    def images_for(cfg, pipe, count):
        if args.paper_scale:
            return paper_images(count, pipe.diffusion.image_size)
        return embedded_images(cfg, count)

    rates: Dict[str, float] = {}

    def peak_rate(cfg) -> Optional[float]:
        """The matmul rate in the path's compute dtype (measured once per dtype), None with --no-floor."""
        if args.no_floor:
            return None
        name = cfg.diffguard.runtime.autocast
        if name not in rates:
            rates[name] = matmul_rate(device, COMPUTE_DTYPES[name])
            report["matmul_gflops_per_second"] = {k: v / 1e9 for k, v in rates.items()}
            print(f"  {device.type} matmul rate in {COMPUTE_DTYPES[name]}: {rates[name] / 1e9:.1f} GFLOP/s "
                  f"(dense square products, best timing"
                  f"{'; TF32 allowed, as for cuDNN convolutions' if device.type == 'cuda' and name == 'none' else ''})",
                  flush=True)
        return rates[name]

    print(f"device: {report['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", load average {report['load_average'][0]:.2f}" if device.type == "cpu" else ""), flush=True)
    measured: dict = {}
    for path in paths:
        cfg, pipe, batch, quick_pipe = setup(path, None)
        count = args.images or batch
        images, ids = images_for(cfg, pipe, count)
        print(f"\n[{path}] {DESCRIPTIONS[path]}: {count} images, batch {batch}, {cfg.diffguard.num_steps} steps, "
              f"depth {cfg.diffguard.depth}, reference {cfg.diffguard.reference}, runtime {describe_runtime(cfg)}",
              flush=True)
        result = measure(pipe, images, ids, batch, repeats, device, breakdown=not args.no_breakdown,
                         quick_pipe=quick_pipe, peak_rate=peak_rate(cfg))
        bare = bare_model_times(pipe, batch, device, repeats=3)
        result.update(bare)
        per_row_unet = bare["bare_unet_ms"] / 1e3 / batch
        formula = result["unet_evals_per_image"] * per_row_unet
        if "classifier_fwd_bwd_ms" in bare:
            formula += result["guidance_steps_per_image"] * bare["classifier_fwd_bwd_ms"] / 1e3 / batch
        decodes = 1 + int(cfg.diffguard.reference == "unguided")
        other_ms = bare.get("grad_cam_ms", 0.0) + bare.get("encode_ms", 0.0) + decodes * bare.get("decode_ms", 0.0)
        formula += other_ms / 1e3 / batch
        result["ratio_formula"] = result["seconds_per_image"] / formula
        result["runtime"] = describe_runtime(cfg)
        result["settings"] = {"num_steps": cfg.diffguard.num_steps, "depth": cfg.diffguard.depth,
                              "reference": cfg.diffguard.reference, "cutouts": cfg.diffguard.guidance.cutout.num,
                              "aes": cfg.diffguard.aes.enabled, "record_curves": cfg.diffguard.aes.record_curves,
                              "distances": list(cfg.diffguard.distances)}
        report["paths"][path] = result
        measured[(path, batch, count)] = result
        r = result
        print(f"  UNet evaluations / image {r['unet_evals_per_image']:.1f} (mean depth {r['mean_depth']:.2f}), "
              f"guidance steps / image {r['guidance_steps_per_image']:.1f}, {r['unet_calls']} denoiser calls")
        print(f"  bare UNet forward at {batch} rows: {bare['bare_unet_ms']:.2f} ms "
              f"({bare['bare_unet_ms'] / batch:.3f} ms/row)"
              + (f"; classifier fwd+bwd over {bare['classifier_rows']} crops: {bare['classifier_fwd_bwd_ms']:.2f} ms"
                 if "classifier_fwd_bwd_ms" in bare else "")
              + (f"; Grad-CAM of {batch} images: {bare['grad_cam_ms']:.2f} ms" if "grad_cam_ms" in bare else "")
              + (f"; encode {bare['encode_ms']:.2f} ms, decode {bare['decode_ms']:.2f} ms"
                 if "encode_ms" in bare else ""))
        if r["model_breakdown_seconds"]:
            print("  model time by group (s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["model_breakdown_seconds"].items()))
        print(f"  pipeline {r['pipeline_seconds']:.3f} s, model replay {r['model_seconds']:.3f} s -> "
              f"{r['images_per_second']:.2f} images/s, overhead ratio {r['overhead_ratio']:.3f} "
              f"(median {r['ratio_median']:.3f}, fastest {r['ratio_fastest']:.3f}, formula {r['ratio_formula']:.3f}), "
              f"peak memory {r['peak_memory_mb']:.0f} MB",
              flush=True)
        if "model_gflop_per_image" in r:
            print(f"  floor: {r['model_gflop_per_image']:.3f} GFLOP / image in the model calls; the replay runs "
                  f"them at {r['model_gflops_per_second']:.1f} GFLOP/s = {100 * r['fraction_of_matmul_rate']:.0f}% of the "
                  f"matmul rate; floor {r['floor_images_per_second']:.2f} images/s, the pipeline reaches "
                  f"{100 * r['pipeline_fraction_of_floor']:.0f}% of it", flush=True)
        save()
        del pipe, quick_pipe

    if scaling:
        path = args.scaling_path
        print(f"\n[scaling] {path}: images/s by batch size", flush=True)
        for b in scaling:
            cfg, pipe, batch, quick_pipe = setup(path, b)
            count = max(b, args.scaling_images)
            key = (path, batch, count)
            if key not in measured:
                images, ids = images_for(cfg, pipe, count)
                measured[key] = measure(pipe, images, ids, batch, repeats, device, breakdown=False,
                                        quick_pipe=quick_pipe, peak_rate=peak_rate(cfg))
            r = measured[key]
            keys = ("images", "images_per_second", "overhead_ratio", "ratio_median", "ratio_fastest",
                    "seconds_per_image", "model_seconds_per_image", "peak_memory_mb", "model_gflops_per_second",
                    "fraction_of_matmul_rate")
            report["scaling"][str(b)] = {k: r[k] for k in keys if k in r}
            print(f"  batch {b:4d}: {r['images']} images, {r['images_per_second']:.2f} images/s, "
                  f"model-only {1 / r['model_seconds_per_image']:.2f} images/s, "
                  f"overhead ratio {r['overhead_ratio']:.3f}"
                  + (f"; model calls at {r['model_gflops_per_second']:.1f} GFLOP/s "
                     f"({100 * r['fraction_of_matmul_rate']:.0f}% of the matmul rate)"
                     if "model_gflops_per_second" in r else ""),
                  flush=True)
            save()
            del pipe, quick_pipe
        first = report["scaling"][str(scaling[0])]
        for b in scaling[1:]:
            entry = report["scaling"][str(b)]
            entry["speedup_vs_first"] = entry["images_per_second"] / first["images_per_second"]
            entry["model_speedup_vs_first"] = first["model_seconds_per_image"] / entry["model_seconds_per_image"]
            print(f"  batch {b} / batch {scaling[0]}: {entry['speedup_vs_first']:.2f}x images/s "
                  f"(the model calls alone: {entry['model_speedup_vs_first']:.2f}x)")
        if "fraction_of_matmul_rate" in first:
            print("  the model calls run at "
                  + ", ".join(f"{100 * report['scaling'][str(b)]['fraction_of_matmul_rate']:.0f}% (batch {b})"
                              for b in scaling)
                  + " of the matmul rate: batching can lift them to about 100%, no further")
        save()
    for note in notes:
        print(f"note: {note}")
    save()
    return report


if __name__ == "__main__":
    main()
