"""``evaluate.py dry_run=true``: check that every file is there and every model loads, print the plan, stop.

The plan counts what the run would score: the benchmark's sets of ``split``, or with ``score_folder`` the
folder's images and the InD validation images its thresholds need.

By the time :func:`print_plan` runs, the benchmark's lists were read (every
listed file checked to exist) and both models were loaded; here the pipeline
is built (which checks the perceptual-distance weights files and the
model / classifier compatibility) and the work is counted.
"""

from __future__ import annotations

from typing import Dict, Optional

from diffguard_pl.config import EvalConfig
from diffguard_pl.data import Benchmark
from diffguard_pl.data.selection import evaluation_sets
from diffguard_pl.method.oracle import DESCRIPTIONS, modes
from diffguard_pl.models import Classifier, DiffusionModel

MAX_CLASSES_SHOWN = 20  # the dry run names the first InD classes with their labels


def scored_sets(cfg: EvalConfig, benchmark: Benchmark, folder_report: Optional[dict] = None) -> Dict[str, tuple]:
    """``set/split`` -> (images the run scores, the set's name in the plan, a note): the benchmark's sets of
    ``cfg.split``, or with ``score_folder`` the InD validation images its thresholds come from and the folder's
    usable images (counted from :func:`~diffguard_pl.jobs.folder.inspect_folder`'s report, as the run picks them:
    at most ``limit_per_set`` / ``score_folder_limit``, chosen by id hash)."""
    if folder_report is None:
        sets = evaluation_sets(benchmark, cfg.limit_per_set, cfg.split)
        group = {s.name: "" if s.name == "ind" else f" ({benchmark.ood[s.name].group})" for s in sets}
        return {f"{s.name}/{s.split}": (len(s), f"{s.name}{group[s.name]} {s.split}", "") for s in sets}
    from diffguard_pl.jobs.folder import FOLDER, KEEP

    def capped(count: int, limit: Optional[int]) -> int:
        return count if limit is None else min(count, limit)

    usable = folder_report["images"] - folder_report["skipped"]
    scored = capped(usable, cfg.score_folder_limit)
    notes = [f"of {usable:,} usable (score_folder_limit={cfg.score_folder_limit}, chosen by id hash)"
             if scored < usable else "",
             f"{folder_report['skipped']} left out by data.on_error=skip" if folder_report["skipped"] else ""]
    about = "; ".join(n for n in notes if n)
    return {"ind/val": (capped(len(benchmark.val), cfg.limit_per_set), "ind val",
                        f" (InD validation: the thresholds keep {KEEP:.0%} of their scores)"),
            f"{FOLDER}/test": (scored, f"{FOLDER} test",
                               f" ({folder_report['folder']}" + (f"; {about})" if about else ")"))}


def print_plan(cfg: EvalConfig, benchmark: Benchmark, classifier: Classifier, diffusion: DiffusionModel,
               encoder: Optional[Classifier] = None, detector_diffusion: Optional[DiffusionModel] = None,
               folder_report: Optional[dict] = None) -> dict:
    """Print what the run would do (``folder_report``: with ``score_folder``, the folder's plan, not the
    benchmark's) and return its counts."""
    from diffguard_pl.method.pipeline import DiffGuardPipeline

    pipeline = DiffGuardPipeline(diffusion, classifier, cfg.diffguard, dry_run=True, encoder=encoder)
    d, g = cfg.diffguard, cfg.diffguard.guidance
    sets = scored_sets(cfg, benchmark, folder_report)
    ladder = pipeline.ladder
    per_image = pipeline.unet_evals(d.depth)  # at full depth: AES can only lower it
    total = sum(count for count, *_ in sets.values())
    kind = type(diffusion.unet).__name__ + (f" + {type(diffusion.vae).__name__}" if diffusion.latent else "")
    lines = [
        f"dry run: every file and model is in place ({cfg.models.diffusion}, {cfg.models.classifier})",
        f"diffusion: {kind}, images {diffusion.image_channels}x{diffusion.image_size}x{diffusion.image_size}, "
        f"denoiser input {diffusion.in_channels}x{diffusion.sample_size}x{diffusion.sample_size}, "
        + ("unconditional" if not diffusion.conditional
           else f"{diffusion.num_classes} classes, null class {diffusion.null_class}"),
        f"classifier: {classifier.spec.arch}, {classifier.spec.num_classes} classes at {classifier.spec.input_size} px",
        f"benchmark {benchmark.name}: InD train {len(benchmark.train)} (baselines fit on "
        f"{min(len(benchmark.train), cfg.baselines.train_samples or len(benchmark.train))})",
    ]
    if benchmark.class_names:  # label: name, so a user sees which folder became which label
        shown = ", ".join(f"{k} {name}" for k, name in enumerate(benchmark.class_names[:MAX_CLASSES_SHOWN]))
        more = len(benchmark.class_names) - MAX_CLASSES_SHOWN
        lines.append(f"  InD classes (label name): {shown}" + (f", ... ({more} more)" if more > 0 else ""))
    if folder_report is not None:
        (val, *_), (scored, *_) = sets.values()
        lines.append(f"score_folder: {scored:,} folder images, each judged in or out at every detector's threshold "
                     f"set on {val:,} InD validation images (not the benchmark's test sets)")
    for count, name, about in sets.values():
        lines.append(f"  {name}: {count:,} images{about}")
    free = g.classifier_free
    dsg = f"on, CAM threshold {free.cam_threshold}" if free.dsg else "off"
    guidance = (f"classifier guidance, scale {g.scale}, clean {g.clean}, {g.cutout.num} {g.cutout.mode} cutouts"
                if g.mode == "classifier" else f"classifier-free guidance, omega {free.omega}, DSG {dsg}")
    reached, start = ladder.reached(d.depth), ladder.synthesis_start(d.depth)
    lines += [
        f"DDIM: {d.num_steps} spaced steps (timesteps {int(ladder.timesteps[1])}, {int(ladder.timesteps[2])}, ..., "
        f"{int(ladder.timesteps[-1])}), {d.ladder} ladder; inversion depth {d.depth} reaches timestep "
        f"{int(ladder.timesteps[reached])}"
        + (f" (AES: stops earlier by {', '.join(k for k in ('psnr', 'ssim', 'dists') if getattr(d.aes, k) is not None)})"
           if d.aes.enabled else ""),
        f"synthesis: from timestep {int(ladder.timesteps[start])} ({d.handoff} handoff), {start} steps; {guidance}; "
        f"x0 clipping: {d.clip_x0}; reference {d.reference}; score {d.score}",
        f"oracle: {cfg.oracle}" + "".join(f"; {mode}: {DESCRIPTIONS[mode]}" for mode in modes(cfg.oracle)),
        f"denoiser evaluations: at most {per_image:,} per image, {per_image * total:,} for {total:,} images",
    ]
    detectors = _diffusion_detectors(cfg, detector_diffusion, classifier)
    for detector in detectors:
        lines.append(f"diffusion detector {detector.name}: {detector.unet_evals_per_image()} UNet evaluations per "
                     f"image, fitted on {detector.fit_on}, params {detector.params}")
    from diffguard_pl.detectors import registry
    from diffguard_pl.detectors.diffusion import unet_evals

    extra = unet_evals(detectors)
    if detectors:
        fit = [d for d in detectors if d.fit_on == registry.FIT_TRAIN]
        lines.append(f"diffusion detectors: {extra} UNet evaluations per image beside DiffGuard's, "
                     + (f"after their statistics of {cfg.diffusion_detectors.train_samples:,} InD training images "
                        f"(cached)" if fit else "nothing to fit before the loop"))
    print("\n".join(lines))
    return {"images": total, "unet_evals_per_image": per_image, "diffusion_detectors_unet_evals_per_image": extra,
            "sets": {key: count for key, (count, *_) in sets.items()}}


def _diffusion_detectors(cfg: EvalConfig, diffusion: Optional[DiffusionModel], classifier: Classifier) -> list:
    if diffusion is None:
        return []
    from diffguard_pl.detectors.diffusion_fitting import build_diffusion_detectors

    return build_diffusion_detectors(cfg, diffusion, classifier)
