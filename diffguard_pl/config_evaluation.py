"""The schema of ``evaluate.py`` (EvalConfig): the models, DiffGuard (inversion, guidance, early stop, scoring,
runtime), the classifier baselines and the plots, on top of what every run shares (diffguard_pl/config_shared.py).

A field's ``# comment``, with the deeper-indented comment lines below it, is its ``--help`` text
(diffguard_pl/cli.py reads it from this source). Detector names are checked against
diffguard_pl/detectors/registry.py, which declares every detector once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from diffguard_pl.config_checks import check_choice, check_fusion_partners, check_positive, parse_shard
from diffguard_pl.config_shared import EMBEDDED, RunConfig, neutral
from diffguard_pl.detectors import registry
from diffguard_pl.records import columns
from diffguard_pl.errors import ConfigError


@dataclass
class CutoutConfig:
    """Random square crops of the clean estimate that amplify the guidance gradient.

    mode bilinear: continuous sides and positions, resized bilinearly. mode released: the released code's
    whole-pixel crops (sides from round(min_frac * S) to round(max_frac * S) - 1 of an S-pixel image: 224..255
    of 256), resized by nearest neighbour.
    """

    num: int = 8  # K crops per sample and step; 0 switches cutout off
    min_frac: float = 0.875  # smallest crop side as a fraction of the image side, in (0, max_frac] (released:
                             # 224 of 256 pixels)
    max_frac: float = 1.0  # largest crop side as a fraction of the image side, in [min_frac, 1]
    mode: str = "bilinear"  # bilinear (continuous sides and positions, bilinear resize) | released (the released
                            # code's whole-pixel crops, nearest-neighbour resize)

    def __post_init__(self) -> None:
        if self.num < 0:
            raise ConfigError(f"diffguard.guidance.cutout.num={self.num} must be >= 0")
        if not 0.0 < self.min_frac <= self.max_frac <= 1.0:
            raise ConfigError("diffguard.guidance.cutout needs 0 < min_frac <= max_frac <= 1")
        check_choice("diffguard.guidance.cutout.mode", self.mode, ["bilinear", "released"])


@dataclass
class ClassifierFreeConfig:
    """Classifier-free guidance with distinct semantic guidance (DSG), the paper's LDM path.

    eps = eps_u + omega * (eps_c - eps_u) inside the DSG mask, eps_u outside.
    The mask: Grad-CAM of the classifier for the label (ReLU, resized to the
    image, min-max normalised per image) above ``cam_threshold``, resized
    (nearest) to the denoiser's resolution and fixed over all steps. With
    ``dsg: false`` the mask covers the whole image.
    """

    omega: float = 10.0  # guidance strength >= 0: eps_u + omega (eps_c - eps_u) inside the mask (released LDM: 10)
    dsg: bool = True  # guide only where the classifier's Grad-CAM is high (DSG); false: the whole image
    cam_layer: Optional[str] = None  # a module name in the timm model (e.g. layer4); null: its last feature stage
    cam_threshold: float = 0.3  # pixels whose normalised Grad-CAM (in [0, 1]) is above this are guided; in
                                # [0, 1) (released: 0.3)

    def __post_init__(self) -> None:
        check_positive("diffguard.guidance.classifier_free.omega", self.omega, allow_zero=True)
        if not 0.0 <= self.cam_threshold < 1.0:
            raise ConfigError(f"diffguard.guidance.classifier_free.cam_threshold={self.cam_threshold} "
                              "must lie in [0, 1)")


@dataclass
class GuidanceConfig:
    """How synthesis follows the label.

    mode classifier (the paper's GDM path): eps_hat = eps - scale * sqrt(1 - a_t) * grad log p(y | x_clean),
    with clean grad and cutout; a class-conditional denoiser also receives the label.
    mode classifier_free (the paper's LDM path): classifier-free guidance of a class-conditional
    denoiser with a null class, optionally restricted by DSG (see :class:`ClassifierFreeConfig`).
    """

    mode: str = "classifier"  # classifier (the paper's GDM path) | classifier_free (its LDM path: a conditional
                              # denoiser with a null class, see diffguard.guidance.classifier_free)
    scale: float = 3.0  # classifier mode: guidance strength >= 0 (eps_hat = eps - scale sqrt(1 - alpha_bar_t)
                        # grad log p(y | x_clean))
    clean: str = "blend"  # what the classifier sees: x0_pred | blend (f x0_pred + (1-f) x_t with
                          # f = sqrt(1 - alpha_bar_t), the released code) | noisy (x_t)
    cutout: CutoutConfig = field(default_factory=CutoutConfig)
    classifier_free: ClassifierFreeConfig = field(default_factory=ClassifierFreeConfig)

    def __post_init__(self) -> None:
        check_choice("diffguard.guidance.mode", self.mode, ["classifier", "classifier_free"])
        check_positive("diffguard.guidance.scale", self.scale, allow_zero=True)
        check_choice("diffguard.guidance.clean", self.clean, ["x0_pred", "blend", "noisy"])


@dataclass
class AESConfig:
    """Adaptive early stop: a sample stops inverting once its latent drifts far enough from x0.

    After each inversion step, the latent x_t (mapped to [0, 1] as (x + 1) / 2,
    not clipped, as the released code feeds it) is compared with x0: PSNR in dB
    with peak 1, SSIM (on the clamped images), and 1 - DISTS when its weights
    exist locally, at ``dists_size`` pixels. A threshold left null is not
    used. ``mode`` any: stop when any used metric falls below its threshold;
    all: when all do. The released thresholds, PSNR < 48.5 with peak 255 on
    [-1, 1] tensors and 1 - DISTS < 0.38, are psnr = 48.5 - 42.11 = 6.39 here
    (10 log10(255^2 / 4) = 42.11 dB) and dists = 0.38.
    """

    enabled: bool = False  # stop each sample's inversion early; needs at least one of psnr, ssim, dists
    psnr: Optional[float] = None  # dB (peak 1 on [0, 1]): a sample stops once the PSNR of its latent against x0
                                  # falls BELOW this (released 48.5 at peak 255 on [-1, 1] = 6.39 here); null: unused
    ssim: Optional[float] = None  # SSIM in [0, 1]: a sample stops once the SSIM of its latent against x0 falls
                                  # BELOW this; null: unused
    dists: Optional[float] = None  # 1 - DISTS in [0, 1] (needs local DISTS weights): a sample stops once it falls
                                   # BELOW this (released: 0.38); null: unused
    mode: str = "any"  # any: stop when any threshold in use is crossed | all: only when all of them are
    min_depth: int = 1  # never stop before this many inversion steps (the maximum is diffguard.depth)
    record_curves: bool = True  # record per-step PSNR / SSIM curves even when AES is off
    dists_size: Optional[int] = None  # side in pixels DISTS sees (resized); null: diffguard.perceptual_size

    def __post_init__(self) -> None:
        check_choice("diffguard.aes.mode", self.mode, ["any", "all"])
        if self.enabled and self.psnr is None and self.ssim is None and self.dists is None:
            raise ConfigError("diffguard.aes.enabled=true needs at least one of aes.psnr, aes.ssim, aes.dists")
        if self.min_depth < 1:
            raise ConfigError(f"diffguard.aes.min_depth={self.min_depth} must be at least 1")


@dataclass
class RuntimeConfig:
    """How the pipeline executes on its device: speed settings, not the method (benchmarks/perf/throughput.py).

    ``autocast`` none | bf16 | fp16: the denoiser, the autoencoder and the classifier's forward passes (label,
    guidance, classifier distances) run under ``torch.autocast`` on the pipeline's device type; the DDIM updates,
    the guidance arithmetic, Grad-CAM / the DSG masks and the distances stay in float32. It changes scores
    slightly, so it is part of the results' fingerprint. ``channels_last``: the models' 4-D weights and inputs
    in channels-last memory format (faster convolutions on GPUs). ``compile``: ``torch.compile`` of the denoiser
    (the first batches pay the compilation). ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` while the
    pipeline runs on CUDA. ``inference_mode``: denoiser calls, inversion and scoring under
    ``torch.inference_mode`` (classifier guidance and Grad-CAM leave it for their gradients); false: ``no_grad``.
    """

    autocast: str = "none"  # none | bf16 | fp16: the models' forward passes under torch.autocast (DDIM updates,
                            # guidance arithmetic and distances stay float32); changes scores slightly
    channels_last: bool = False  # 4-D weights and inputs in channels-last memory format (faster on GPUs)
    compile: bool = False  # torch.compile the denoiser (the first batches pay for the compilation)
    cudnn_benchmark: bool = True  # torch.backends.cudnn.benchmark while the pipeline runs (CUDA only)
    inference_mode: bool = True  # denoiser calls, inversion and scoring under torch.inference_mode (guidance and
                                 # Grad-CAM still get their gradients); false: torch.no_grad

    def __post_init__(self) -> None:
        check_choice("diffguard.runtime.autocast", self.autocast, ["none", "bf16", "fp16"])


DISTANCES = list(columns.DISTANCES)  # declared with their meanings in diffguard_pl/records/columns.py


CLIP_X0 = ["none", "synthesis", "both"]


@dataclass
class DiffGuardConfig:
    """Inversion, guided synthesis and scoring.

    ``depth`` counts inversion steps (denoiser evaluations of the inversion). The ``ladder`` decides which
    levels they walk (diffguard_pl/method/ddim.py): ``symmetric`` (default) reaches the spaced timestep t_{depth-1}
    and synthesis takes ``depth`` steps back; ``released`` (guided-diffusion's ``ddim_reverse_sample``, as the
    released code) reaches t_depth (100 steps, depth 90: t = 900) and synthesis takes depth + 1 steps.
    ``handoff`` exact starts synthesis at the level the inversion reached; ``released`` one level above it
    (the released code's off-by-one, for exact reproduction only). ``clip_x0``: guided-diffusion's
    ``clip_denoised`` in its order: x0 predicted, clipped to [-1, 1], eps re-derived from it, then classifier
    guidance added to that eps (its gradient taken on the unclipped clean estimate); ``both`` also clips every
    inversion step after the first.
    """

    num_steps: int = 50  # spaced DDIM steps over the diffusion model's training schedule (released GDM: 100)
    depth: int = 25  # inversion steps (denoiser evaluations), at most num_steps (released GDM: 90); deeper: the
                     # latent is noisier and more of the image is synthesised anew
    ladder: str = "symmetric"  # symmetric (the inversion reaches spaced timestep t_{depth-1}, synthesis takes
                               # depth steps) | released (guided-diffusion's ddim_reverse_sample: reaches t_depth,
                               # synthesis takes depth + 1 steps)
    handoff: str = "exact"  # exact (synthesis starts where the inversion ended) | released (one level above it:
                            # the released code's off-by-one, for exact reproduction only)
    timestep_offset: int = 0  # spaced timesteps are k * stride + offset, in training timesteps (latent-diffusion's
                              # DDIM: 1)
    reference: str = "input"  # compare the synthesis with: input | unguided (reconstruction from the same latent)
    score: str = "l2"  # the distance reported as detector `diffguard`; one of distances
    distances: List[str] = field(default_factory=lambda: ["l1", "l2", "psnr", "ssim", "logit_l1", "feature_cos"])
        # computed between the synthesis and the reference, each also a detector diffguard/NAME: l1 | l2 (mean
        # absolute / squared pixel difference on [0, 1]) | psnr (minus the PSNR in dB) | ssim (1 - SSIM) | logit_l1 |
        # feature_cos (the classifier's logits / features) | contrastive (needs models.encoder) | dists | lpips
        # (need their weights locally)
    perceptual_size: Optional[int] = 64  # side in pixels images are resized to for DISTS / LPIPS; null: as they are
    seed: int = 0  # combined with each sample's id for cutout randomness
    clip_x0: str = "none"  # none | synthesis (clip the clean estimate to [-1, 1] in synthesis: x0 clipped, eps
                           # re-derived, then guidance added, as guided-diffusion's clip_denoised) | both (also
                           # every inversion step after the first)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    aes: AESConfig = field(default_factory=AESConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # speed settings (autocast, compile, ...)

    def __post_init__(self) -> None:
        check_choice("diffguard.ladder", self.ladder, ["symmetric", "released"])
        check_choice("diffguard.handoff", self.handoff, ["exact", "released"])
        check_choice("diffguard.clip_x0", self.clip_x0, CLIP_X0)
        # Levels: num_steps spaced timesteps above the clean level; the released ladder treats the input as
        # the first of them, the released handoff starts synthesis one level higher.
        most = self.num_steps - (self.ladder == "released") - (self.handoff == "released")
        if not 1 <= self.depth <= most:
            raise ConfigError(f"diffguard.depth={self.depth} must lie in [1, {most}] with diffguard.num_steps="
                              f"{self.num_steps}, ladder={self.ladder}, handoff={self.handoff}")
        if self.timestep_offset < 0:
            raise ConfigError(f"diffguard.timestep_offset={self.timestep_offset} must be >= 0")
        check_choice("diffguard.reference", self.reference, ["input", "unguided"])
        for name in self.distances:
            check_choice("diffguard.distances", name, DISTANCES)
        if self.aes.min_depth > self.depth:
            raise ConfigError(f"diffguard.aes.min_depth={self.aes.min_depth} exceeds diffguard.depth={self.depth}")
        if self.score not in self.distances:
            raise ConfigError(f"diffguard.score={self.score!r} must be one of diffguard.distances {list(self.distances)}")
        for key, value in (("perceptual_size", self.perceptual_size), ("aes.dists_size", self.aes.dists_size)):
            if value is not None and value < 8:
                raise ConfigError(f"diffguard.{key}={value} is too small for VGG features; use 32 or more, or null")


@dataclass
class ModelPaths:
    """Where the models are.

    ``classifier``: a portable folder (classifier.json + model.safetensors), or a weights file (timm,
    torchvision or OpenOOD state dict, .pth / .ckpt / .safetensors), which then needs ``classifier_arch``
    and takes the ``classifier_*`` keys below (number of classes: the benchmark's).
    ``diffusion``: a diffusers folder (pixel or latent, UNet or DiT), or a Hugging Face Hub id
    (e.g. google/ddpm-cifar10-32) already in the local cache (nothing is downloaded).
    """

    classifier: str = str(EMBEDDED / "digits" / "classifier")  # a portable folder (classifier.json + weights) or
                                                               # a weights file (needs models.classifier_arch)
    diffusion: str = str(EMBEDDED / "digits" / "diffusion_uncond")  # a diffusers folder, or a Hugging Face Hub id
                                                                    # already in the local cache
    classifier_arch: Optional[str] = None  # a weights file's timm name, e.g. resnet50 (torchvision layout),
                                           # openood_resnet18_32x32; null for a portable folder
    classifier_input_size: Optional[int] = None  # side in pixels the classifier sees; null: data.resolution
    classifier_mean: Optional[List[float]] = None  # normalisation mean per channel; null: 0.5 per channel
    classifier_std: Optional[List[float]] = None  # normalisation standard deviation per channel; null: 0.5 each
    classifier_view: str = "resize"  # resize | center_crop: how a larger image reaches classifier_input_size
    encoder: Optional[str] = None  # the contrastive encoder folder (train.py task=contrastive) of distance contrastive
    diffusion_num_classes: Optional[int] = None  # classes of a conditional model; null: what the checkpoint says
    diffusion_null_class: Optional[int] = None  # the null (unconditional) class id; null: what the checkpoint says
    allow_classifier_mismatch: bool = neutral(False)  # evaluate a classifier that the InD validation check refuses


@dataclass
class BaselineConfig:
    """The classifier detectors: which run beside DiffGuard, and how their hyperparameters are set.

    Names, what each needs and its grid: docs/detectors.md (the table of diffguard_pl/detectors/registry.py). Each
    is fitted on InD training images; a hyperparameter not given in ``params`` is chosen on validation splits like
    OpenOOD v1.5 (the grid value with the best AUROC of InD validation against the pooled OOD validation splits,
    never test splits; ties to the smaller value); without OOD validation data the registry's defaults are used. A
    detector that cannot run on the classifier is left out with its reason. The choices, every candidate's
    validation AUROC and each detector's cost are written to results.json under "baselines".
    """

    detectors: List[str] = field(default_factory=registry.default_names)  # classifier detectors to run, each a
                                                                          # column of scores.csv; every name, what
                                                                          # it needs and costs: docs/detectors.md
    params: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # fixed hyperparameters, not tuned: e.g.
                                                                     # baselines.params.knn.k=10
    grids: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # grids replacing the registry's: e.g.
                                                                    # baselines.grids.knn.k=[10,50]
    train_samples: Optional[int] = None  # fit the detectors on this many InD train images (chosen by id hash);
                                         # null: all

    def __post_init__(self) -> None:
        try:
            registry.check_names("baselines.detectors", self.detectors)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for key in ("params", "grids"):
            for name, values in getattr(self, key).items():
                if name not in self.detectors:
                    raise ConfigError(f"baselines.{key} has {name!r}, which baselines.detectors does not run: add it "
                                      f"there, or drop baselines.{key}.{name}")
                known = registry.hyperparameters(name)
                for param, value in values.items():
                    if param not in known:
                        raise ConfigError(f"baselines.{key}.{name}.{param}: {name} has "
                                          f"{'the hyperparameters ' + ', '.join(known) if known else 'none'}")
                    if key == "grids" and (not isinstance(value, (list, tuple)) or not value):
                        raise ConfigError(f"baselines.grids.{name}.{param}={value} must be a non-empty list")
        check_positive("baselines.train_samples", self.train_samples, allow_none=True)


@dataclass
class DiffusionDetectorsConfig:
    """The diffusion detectors beside DiffGuard: DDPM-OOD, LMD, DiffPath, MSMA (docs/diffusion_detectors.md).

    Each reads the images through an unconditional diffusion model (``model``; no classifier) and is a column of
    scores.csv. DiffPath and MSMA fit a Gaussian mixture on ``train_samples`` InD training images (their
    statistics cached on disk); DDPM-OOD z-scores its errors on the run's InD validation records; LMD fits
    nothing. Their parameters default to the registry's; a preset sets those chosen on validation splits
    (benchmarks/experiments/diffusion_grid.py).
    """

    names: List[str] = field(default_factory=list)  # e.g. [diffpath, msma, ddpm_ood, lmd, diffpath_1d]; [] = none
    params: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # e.g. diffusion_detectors.params.lmd.repetitions=2
                                                                     # (also for detectors not in names: a preset's
                                                                     # choices, used when one is added to names)
    model: Optional[str] = None  # their unconditional diffusion model (a diffusers folder); null: models.diffusion
    train_samples: int = 2000  # InD training images (chosen by id hash) DiffPath's and MSMA's mixtures are fitted on

    def __post_init__(self) -> None:
        for name in self.names:
            if not registry.is_diffusion_detector(name):
                raise ConfigError(f"diffusion_detectors.names has {name!r}, which is no diffusion detector: choose "
                                  f"from {', '.join(d.name for d in registry.DIFFUSION_DETECTORS)}")
        if len(set(self.names)) < len(self.names):
            raise ConfigError(f"diffusion_detectors.names={self.names} names a detector twice")
        for name, given in self.params.items():  # a preset may set a detector's params without running it
            if not registry.is_diffusion_detector(name):
                raise ConfigError(f"diffusion_detectors.params has {name!r}, which is no diffusion detector: choose "
                                  f"from {', '.join(d.name for d in registry.DIFFUSION_DETECTORS)}")
            for key, choices in registry.diffusion_detector(name).choices.items():
                check_choice(f"diffusion_detectors.params.{name}.{key}", given.get(key, choices[0]), choices)
            try:
                registry.diffusion_detector(name).cost(registry.diffusion_params(name, given))
            except (ValueError, TypeError) as error:
                raise ConfigError(f"diffusion_detectors.params.{name}: {error}") from None
        check_positive("diffusion_detectors.train_samples", self.train_samples)


@dataclass
class EvalCallbacksConfig:
    """Plots and tables evaluate.py draws (they never change a score)."""

    curves: bool = True  # per-step inversion quality curves per set (CSV, PNG, W&B line plots)
    reconstructions: int = 8  # samples per set drawn as input / synthesis / reference / difference; 0 = off
    reconstruction_select: str = "first"  # first (by id) | extremes (half lowest, half highest DiffGuard score)
    score_plots: bool = True  # score histograms per detector, InD against each OOD set

    def __post_init__(self) -> None:
        check_choice("callbacks.reconstruction_select", self.reconstruction_select, ["first", "extremes"])


@dataclass
class EvalConfig(RunConfig):
    """Root schema of ``evaluate.py``: DiffGuard and the classifier baselines on a benchmark."""

    output_dir: str = neutral("outputs/eval")  # results.json, scores.csv, records/ (resume), plots
    oracle: str = "none"  # also synthesise under oracle labels: none | ind (InD samples under their true label) |
                          # paper (also a random label for every OOD sample, the released oracle_label) | both
    limit_per_set: Optional[int] = neutral(None)  # evaluate N samples of each set, chosen by id hash (quick runs);
                                                  # null: every sample
    split: str = neutral("test")  # test (report on test splits) | val (on validation splits: for tuning, never test)
    resume: bool = neutral(True)  # skip samples already finished in output_dir/records by a run with the same config
    shard: Optional[str] = neutral(None)  # "i/n": only samples whose index modulo n is i (merge: diffguard_pl.jobs.merge)
    dry_run: bool = neutral(False)  # check every file and model, print the plan (sets, counts, steps) and stop
    score_folder: Optional[str] = None  # score the images of a folder (no labels): scores + in / out decisions as CSV
    score_folder_limit: Optional[int] = neutral(None)  # score_folder: score this many of its images (chosen by id
                                                       # hash); null: every image of the folder
    fusion_partners: List[str] = field(default_factory=lambda: list(registry.FUSION_DEFAULT))  # detectors X
        # fused with DiffGuard as diffguard+X (z-scores summed, normalised on InD validation): a classifier detector
        # of baselines.detectors, a diffusion detector of diffusion_detectors.names, or several joined by + (e.g.
        # ddpm_ood+vim: also reported without DiffGuard)
    recommended: str = neutral(columns.DIFFGUARD)  # the detector whose in / out decision score_folder's verdict
        # reads (it changes no score): diffguard, a detector of baselines.detectors or diffusion_detectors.names,
        # diffguard+X for a fusion partner X, or a partner of several detectors on its own (e.g. gmm+she+lts);
        # checked when score_folder is set (a benchmark run that drops it from fusion_partners reports the others)
    models: ModelPaths = field(default_factory=ModelPaths)
    diffguard: DiffGuardConfig = field(default_factory=DiffGuardConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    diffusion_detectors: DiffusionDetectorsConfig = field(default_factory=DiffusionDetectorsConfig)
    callbacks: EvalCallbacksConfig = neutral(factory=EvalCallbacksConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("split", self.split, ["test", "val"])
        check_choice("oracle", self.oracle, ["none", "ind", "paper", "both"])
        check_positive("limit_per_set", self.limit_per_set, allow_none=True)
        check_positive("score_folder_limit", self.score_folder_limit, allow_none=True)
        check_fusion_partners(self.fusion_partners, self.baselines.detectors, self.diffusion_detectors.names)
        reported = columns.reported_detectors(self.baselines.detectors, self.diffusion_detectors.names,
                                              self.fusion_partners)
        if self.score_folder is not None and self.recommended not in reported:
            raise ConfigError(f"recommended={self.recommended!r}, score_folder's verdict, is no detector this run "
                              f"reports: name one of "
                              f"{reported}, or add it to baselines.detectors, diffusion_detectors.names or "
                              f"fusion_partners")
        parse_shard(self.shard)

    def from_command_line(self, config_files: List[str], overrides: List[str]) -> "EvalConfig":
        """A folder run writes to a folder of its own, ``<output_dir>/folders/<the folder's name>``, unless the
        command line sets ``output_dir=`` (used as given): the preset's output_dir holds its benchmark run."""
        cfg = super().from_command_line(config_files, overrides)
        if cfg.score_folder is None or any(item.split("=", 1)[0].strip() == "output_dir" for item in overrides):
            return cfg
        name = Path(cfg.score_folder).resolve().name or "root"
        return replace(cfg, output_dir=str(Path(cfg.output_dir) / "folders" / name))
