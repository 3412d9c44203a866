"""Every detector's name, in one table: the classifier detectors (ours and pytorch-ood's) with what each reads and
needs, its hyperparameter grid and its paper. The columns DiffGuard's detectors write are named in
diffguard_pl/records/columns.py.

Config validation (``baselines.detectors``, ``fusion_partners``), ``--help`` (their defaults), the Python API
(``Baseline(name, ...)``), the evaluator, results.json / columns.json and the fused detectors read this table; no
other module writes a detector's name. docs/detectors.md holds the tables of diffguard_pl/detectors/tables.py (a test keeps them equal).

Grids: OpenOOD v1.5's postprocessor sweep (``configs/postprocessors/<name>.yml``) where it has one, else
pytorch-ood's ``hyperparameter_space``, else none; percentiles are fractions, as pytorch-ood takes them. A grid
value beyond what the classifier allows (KNN's k above the training features, GEN's M above the classes, ...) is
dropped; with none left, the largest allowed value is used. ``defaults`` are used when there is no validation data
to choose on (OpenOOD's ``postprocessor_args`` where it has them, else pytorch-ood's constructor defaults).

Importing this module imports neither torch nor pytorch-ood, so that config parsing and ``--help`` stay fast; a
detector's class is imported when it is built (:mod:`diffguard_pl.detectors.classifier_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence

# --------------------------------------------------------------------------------------- classifier detectors

# What a detector reads of a sample. FEATURES also covers the activation-shaping detectors that pytorch-ood takes
# as feature maps: they act on the pooled penultimate features as 1x1 maps, OpenOOD v1.5's placement
# (``feature.view(B, -1, 1, 1)``) and the papers' for ResNets, so they need no extra classifier pass.
LOGITS, FEATURES, FEATURE_MAPS, IMAGES = "logits", "penultimate features", "feature maps", "images"

# What a detector needs of the classifier or of the data (checked before it runs: classifier_parts.why_not).
LINEAR_HEAD = "a linear head"  # logits = W f + b on the penultimate features
LABELS = "InD training labels"
GRADIENTS = "gradients"  # input or parameter gradients at scoring time (not under torch.inference_mode)
MAPS_4D = "4-D feature maps"  # forward_features gives [B, C, H, W]
STAGES = "stage modules"  # timm's feature_info names the modules NAC hooks
DROPOUT = "dropout"  # Monte-Carlo dropout: the classifier must have dropout to switch on


class Sizes(NamedTuple):
    """What a grid's limits depend on: InD training samples the detector is fitted on, feature width, classes."""

    train: int
    features: int
    classes: int


Grid = Mapping[str, Any]  # name -> candidates (a sequence, or a function of Sizes)


@dataclass(frozen=True)
class Detector:
    """One classifier detector: how to build it on a classifier, and what it needs."""

    name: str  # its column in scores.csv and its key in results.json
    meaning: str  # what its score is (columns.json); higher = more OOD, always
    unit: str
    reads: str  # LOGITS | FEATURES | FEATURE_MAPS | IMAGES
    implementation: str  # the class, "module.Class"; pytorch-ood's unless ours is measured to be better
    wiring: Mapping[str, Optional[str]] = field(default_factory=dict)  # constructor keyword -> ClassifierParts
                                                                       # attribute (None: the value None)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # constructor keywords never tuned
    needs: FrozenSet[str] = frozenset()
    grid: Grid = field(default_factory=dict)
    grid_source: str = "none"
    defaults: Grid = field(default_factory=dict)  # without validation data
    limits: Mapping[str, Callable[[Sizes], int]] = field(default_factory=dict)  # largest allowed value
    fit_fraction: Optional[float] = None  # fitted on this fraction of the InD training samples (else all)
    one_at_a_time: bool = False  # scored one sample at a time: its implementation lets a batch's samples interact
    paper_of: Optional[str] = None  # the class whose ``info.paper`` names the paper (None: implementation; "": none)
    default: bool = True  # in baselines.detectors by default
    unavailable: Optional[str] = None  # why it cannot run on this project's classifiers (None: it can)
    note: str = ""

    @property
    def paper_class(self) -> str:
        return self.implementation if self.paper_of is None else self.paper_of


POOD = "pytorch_ood.detector."
OURS = "diffguard_pl.detectors.baselines."
OPENOOD = "OpenOOD v1.5"
PYTORCH_OOD = "pytorch-ood"
NEG_ENERGY = "logits, negated"
PERCENTILES = [0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95]  # OpenOOD's ASH / SCALE sweep, as fractions
POOLED = {"backbone": "pooled_maps", "head": "head_on_pooled"}
# The detectors that read images (an extra classifier pass, most with gradients) are not run by default: on
# Fashion-OOD they took 196 of the 217 s the default set would take to fit and tune, and 5.6 of its 6 ms per image
# (docs/detectors.md); each is one name away (baselines.detectors).
IMAGE_PASS = "not run by default: it reads the images (see docs/detectors.md, Cost)"
HEAD = {"encoder": None, "head": "head"}


OPENOOD_VIM_GRID = (256, 1000)  # OpenOOD v1.5 vim.yml dim_list, for ResNet-50's 2048-d features
OPENOOD_FEATURE_DIM = 2048


def default_vim_dim(feature_dim: int) -> int:
    """Principal-space size used by the ViM paper: 1000 for D >= 2048, 512 for D >= 768, else D // 2."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return max(1, feature_dim // 2)


def default_vim_grid(feature_dim: int) -> list[int]:
    """ViM's ``dim`` grid for feature width D: OpenOOD's ``{256, 1000}`` where below D.

    When neither is (D <= 256), the same ratios to OpenOOD's width 2048:
    ``{round(D * 256 / 2048), round(D * 1000 / 2048)}`` clipped to ``[1, D - 1]``, deduplicated, ascending.
    """
    if feature_dim < 2:
        raise ValueError(f"ViM needs a feature dimension >= 2, got {feature_dim}")
    grid = [v for v in OPENOOD_VIM_GRID if v < feature_dim]
    if not grid:
        grid = [min(max(round(feature_dim * v / OPENOOD_FEATURE_DIM), 1), feature_dim - 1) for v in OPENOOD_VIM_GRID]
    return sorted(set(grid))


def _vim_grid(sizes: Sizes) -> List[int]:
    return default_vim_grid(sizes.features)


def _vim_default(sizes: Sizes) -> int:
    return default_vim_dim(sizes.features)


CLASSIFIER_DETECTORS = (
    # ---- logits
    Detector("msp", "minus the largest softmax probability", "probability, negated", LOGITS, POOD + "MaxSoftmax",
             {"model": None}),
    Detector("ebo", "minus the energy score, T logsumexp(logits / T)", NEG_ENERGY, LOGITS, POOD + "EnergyBased",
             {"model": None}, grid={"t": [1.0]}, grid_source=OPENOOD, defaults={"t": 1.0}),
    Detector("maxlogit", "minus the largest logit", NEG_ENERGY, LOGITS, POOD + "MaxLogit", {"model": None}),
    Detector("entropy", "entropy of the softmax", "nats", LOGITS, POOD + "Entropy", {"model": None}),
    Detector("gen", "generalised entropy of the M largest softmax probabilities (gamma, M: results.json baselines)",
             "unitless", LOGITS, POOD + "GEN", {"model": None},
             grid={"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100, 200, 500, 1000]}, grid_source=OPENOOD,
             defaults={"gamma": 0.1, "M": 100}, limits={"M": lambda s: s.classes}),
    Detector("klm", "KL divergence of the softmax to the closest mean softmax of InD training samples predicted as "
             "one class", "nats", LOGITS, POOD + "KLMatching", {"model": None},
             note="fitted on InD training samples (the paper and OpenOOD: on InD validation samples)"),
    Detector("tempscale", "minus the largest softmax probability at the temperature fitted to the InD training "
             "labels", "probability, negated", LOGITS, POOD + "TemperatureScaling", {"model": None},
             needs=frozenset({LABELS})),
    Detector("openmax", "probability of the unknown class after OpenMax's Weibull recalibration of the logits",
             "probability", LOGITS, POOD + "OpenMax", {"model": None}, needs=frozenset({LABELS}),
             grid={"tailsize": [10, 20, 30, 40, 50], "alpha": [1, 3, 5, 10, 15, 20],
                   "euclid_weight": [0.0, 0.25, 0.5, 0.75, 1.0]}, grid_source=PYTORCH_OOD,
             defaults={"tailsize": 25, "alpha": 10, "euclid_weight": 1.0}, limits={"alpha": lambda s: s.classes},
             one_at_a_time=True, default=False,
             note="scored one sample at a time: pytorch-ood 0.4.0's OpenMax measures distances only to the classes "
             "some sample of the batch predicts, so in a batch a score depends on the other samples; not run by "
             "default: choosing among its 75 candidates took 369 s on Fashion-OOD (one CPU thread; KNN, the slowest "
             "detector of features, 17 s)"),
    Detector("webo", "minus the energy of class-weighted logits", NEG_ENERGY, LOGITS, POOD + "WeightedEBO",
             default=False, unavailable="needs per-class energy weights learned in training (VOS); a classifier "
             "trained with cross-entropy alone has none"),
    # ---- penultimate features
    Detector("knn", "distance of the normalised penultimate features to the k-th nearest InD training feature "
             "(k: results.json baselines)", "unitless, 0 to 2", FEATURES, OURS + "KNN",
             grid={"k": [50, 100, 200, 500, 1000]}, grid_source=OPENOOD, defaults={"k": 50},
             limits={"k": lambda s: s.train}, paper_of=POOD + "KNN"),
    Detector("vim", "ViM: the features' residual outside the principal subspace, scaled, minus logsumexp of the "
             "logits (dim: results.json baselines)", "logits", FEATURES, OURS + "ViM", {"head": "head"},
             needs=frozenset({LINEAR_HEAD}), grid={"dim": _vim_grid}, grid_source=OPENOOD + " (dim {256, 1000}; "
             "below 257 features the same ratios to 2048)", defaults={"dim": _vim_default},
             limits={"dim": lambda s: s.features - 1}, paper_of=POOD + "ViM"),
    Detector("mds", "half the squared Mahalanobis distance of the features to the closest class mean (shared "
             "covariance)", "squared feature units", FEATURES, POOD + "Mahalanobis", {"encoder": None},
             needs=frozenset({LABELS})),
    Detector("rmds", "relative Mahalanobis distance: to the closest class mean minus to the mean of all InD "
             "features", "squared feature units", FEATURES, POOD + "RMD", {"encoder": None},
             needs=frozenset({LABELS})),
    Detector("gmm", "minus the log-likelihood of the features under one Gaussian per class (a mixture)", "nats",
             FEATURES, POOD + "GMM", {"encoder": None}, needs=frozenset({LABELS}), paper_of="",
             note="no single paper introduced it (pytorch-ood: a classical baseline)"),
    Detector("dice", "minus the energy of a head whose smallest weight contributions (fraction p) are masked",
             NEG_ENERGY, FEATURES, POOD + "DICE", {"encoder": None, "w": "weight", "b": "bias"},
             needs=frozenset({LINEAR_HEAD}), grid={"p": [0.9]}, grid_source=OPENOOD + " (not swept)",
             defaults={"p": 0.9}),
    Detector("fdbd", "minus the mean distance of the features to the decision boundaries, over their distance to "
             "the InD mean", "unitless", FEATURES, POOD + "fDBD", HEAD, needs=frozenset({LINEAR_HEAD}),
             note="OpenOOD also sweeps distance_as_normalizer {True, False}; pytorch-ood implements True only"),
    Detector("nnguide", "minus the energy times the mean similarity to the k closest energy-scaled InD features of "
             "the bank", NEG_ENERGY, FEATURES, POOD + "NNGuide", HEAD, grid={"k": [100]},
             grid_source=OPENOOD + " (not swept)", defaults={"k": 100}, limits={"k": lambda s: s.train},
             fit_fraction=0.01, note="bank: 1% of the InD training samples (OpenOOD's alpha = 0.01)"),
    Detector("she", "minus the inner product of the features with the mean feature of the correctly classified InD "
             "training samples of the predicted class", "feature units squared, negated", FEATURES, POOD + "SHE",
             HEAD, needs=frozenset({LABELS})),
    Detector("nci", "minus the cosine of the centred features with the predicted class's weights, minus alpha "
             "times their L1 norm", "unitless", FEATURES, POOD + "NCI", HEAD, needs=frozenset({LINEAR_HEAD}),
             grid={"alpha": [0.0001, 0.001, 0.01, 0.1]}, grid_source=OPENOOD, defaults={"alpha": 0.0001}),
    Detector("pnml", "pNML regret of the head on the normalised features, over log C", "unitless", FEATURES,
             POOD + "PNML", HEAD),
    Detector("lts", "minus the energy of logits scaled by the squared ratio of all to the top-p activation mass",
             NEG_ENERGY, FEATURES, POOD + "LTS", HEAD, defaults={"p": 0.05}),
    Detector("ash", "minus the energy after ASH-B: the smallest fraction (percentile) of the penultimate features "
             "zeroed, the rest set to their mean", NEG_ENERGY, FEATURES, POOD + "ASH", POOLED,
             {"variant": "ash-b"}, grid={"percentile": PERCENTILES}, grid_source=OPENOOD,
             defaults={"percentile": 0.9}, note="ASH-B, as OpenOOD's ash_net"),
    Detector("react", "minus the energy after clipping the penultimate features at their percentile on InD "
             "training samples", NEG_ENERGY, FEATURES, POOD + "ReAct", POOLED,
             grid={"percentile": [0.85, 0.90, 0.95, 0.99]}, grid_source=OPENOOD, defaults={"percentile": 0.9}),
    Detector("scale", "minus the energy after scaling the penultimate features by exp(total over top activation "
             "mass)", NEG_ENERGY, FEATURES, POOD + "SCALE", POOLED, grid={"percentile": PERCENTILES},
             grid_source=OPENOOD, defaults={"percentile": 0.85}),
    Detector("vra", "minus the energy after clipping each penultimate feature to its lower / upper percentile on "
             "InD training samples", NEG_ENERGY, FEATURES, POOD + "VRA", POOLED,
             grid={"upper_percentile": [0.85, 0.90, 0.95, 0.99], "lower_percentile": [0.01, 0.05, 0.10, 0.15]},
             grid_source=OPENOOD, defaults={"upper_percentile": 0.9, "lower_percentile": 0.1},
             note="pytorch-ood's VRA: a threshold per feature (OpenOOD's: one over all features)"),
    # ---- feature maps
    Detector("rankfeat", "minus the energy after removing the rank-1 component of the last feature maps",
             NEG_ENERGY, FEATURE_MAPS, POOD + "RankFeat", {"backbone": "feature_maps", "head": "head_on_maps"},
             needs=frozenset({MAPS_4D}), default=False, note=IMAGE_PASS),
    # ---- images: gradients or several passes
    Detector("odin", "minus the largest softmax probability at temperature T of the input moved by eps against "
             "the gradient of its loss", "probability, negated", IMAGES, POOD + "ODIN", {"model": "classifier"},
             needs=frozenset({GRADIENTS}), grid={"temperature": [1, 10, 100, 1000], "eps": [0.0014, 0.0028]},
             grid_source=OPENOOD, defaults={"temperature": 1000, "eps": 0.0014}, default=False,
             note=IMAGE_PASS + "; eps in [0, 1] pixel units, as OpenOOD (its gradient divided by the normalisation "
             "std)"),
    Detector("gradnorm", "minus the L1 norm of the gradient of the KL divergence to the uniform distribution with "
             "respect to the head's weights", "unitless, negated", IMAGES, POOD + "GradNorm",
             {"model": "classifier", "param_filter": "head_weight_only"}, needs=frozenset({GRADIENTS}), default=False,
             note=IMAGE_PASS),
    Detector("gradunc", "minus the squared norm of the gradient of the cross-entropy to an all-ones label with "
             "respect to the head's weights", "unitless, negated", IMAGES, POOD + "GradUncertainty",
             {"model": "classifier", "param_filter": "head_weight_only"}, needs=frozenset({GRADIENTS}), default=False,
             note=IMAGE_PASS),
    Detector("mds_odin", "Mahalanobis score of the input moved by eps towards the closest class mean",
             "squared feature units", IMAGES, POOD + "MahalanobisODIN", {"encoder": "features"},
             needs=frozenset({LABELS, GRADIENTS}), default=False, note=IMAGE_PASS),
    Detector("nac", "minus the neuron activation coverage of the input's gradient-weighted stage activations under "
             "InD training histograms", "unitless, negated", IMAGES, POOD + "NACUE",
             {"model": "classifier", "layers": "stages"}, needs=frozenset({GRADIENTS, STAGES}), default=False,
             note=IMAGE_PASS),
    Detector("mcd", "mean over classes of the softmax's variance over 30 dropout samples", "probability squared",
             IMAGES, POOD + "MCD", {"model": "classifier"}, needs=frozenset({DROPOUT}), default=False, note=IMAGE_PASS),
    # ---- not wired
    Detector("gram", "Gram-matrix deviations of several layers' activations", "unitless", IMAGES, POOD + "Gram",
             default=False, unavailable="needs the classifier cut into a sequence of layers; a timm model is not"),
    Detector("multi_mds", "Mahalanobis distances of several layers, combined", "unitless", IMAGES,
             POOD + "MultiMahalanobis", default=False,
             unavailable="needs one feature encoder per layer; a timm model does not give them"),
    Detector("mcm", "maximum concept matching of image and class-text embeddings", "probability, negated", FEATURES,
             POOD + "MCM", default=False, unavailable="needs a vision-language model's class text embeddings (CLIP)"),
)

# --------------------------------------------------------------------------------------- diffusion detectors

# What a diffusion detector is fitted on: a density model on InD training statistics, before the loop; per-statistic
# z-scores on the run's InD validation records (in the report); nothing.
FIT_TRAIN, FIT_VAL, FIT_NONE = "InD training images", "InD validation images", "nothing"


@dataclass(frozen=True)
class DiffusionDetector:
    """One detector that reads images through the unconditional diffusion model (no classifier)."""

    name: str  # its column in scores.csv and its key in results.json
    meaning: str  # what its score is (columns.json); higher = more OOD, always
    unit: str
    fit_on: str  # FIT_TRAIN | FIT_VAL | FIT_NONE
    defaults: Mapping[str, Any]  # used unless diffusion_detectors.params sets a value (presets: chosen on validation)
    grid: Mapping[str, Sequence]  # what benchmarks/experiments/diffusion_grid.py tries on validation splits
    cost: Callable[[Mapping[str, Any]], int]  # UNet evaluations per image, from the (complete) params
    cost_formula: str
    paper: tuple  # (title, venue, year, url)
    code: str  # the authors' repository
    authors: str  # what the authors' code runs, in the same terms
    note: str = ""
    choices: Mapping[str, Sequence[str]] = field(default_factory=dict)  # a parameter's values (first: no classifier)


def ddpm_ood_levels(params: Mapping[str, Any]) -> List[int]:
    """DDPM-OOD's start levels: 2, 2 + skip, ... <= num_steps (the authors' ``[1::skip]`` of their schedule)."""
    return list(range(2, int(params["num_steps"]) + 1, int(params["skip"])))


DIFFUSION_DETECTORS = (
    DiffusionDetector(
        "ddpm_ood", "DDPM-OOD: the reconstruction errors from several start levels (fresh noise, DDIM back), each "
        "z-scored per level on InD validation, summed over error kinds, averaged over levels", "z-score", FIT_VAL,
        defaults={"num_steps": 10, "skip": 4, "features": "none"}, choices={"features": ("none", "classifier")},
        grid={"num_steps": [10, 20], "skip": [4, 8], "features": ["none", "classifier"]},
        cost=lambda p: sum(ddpm_ood_levels(p)), cost_formula="sum of the start levels (level k: k DDIM steps)",
        paper=("Denoising diffusion models for out-of-distribution detection", "CVPR Workshops", 2023,
               "https://arxiv.org/abs/2211.07740"), code="https://github.com/marksgraham/ddpm-ood",
        authors="PLMS, 100 steps, 7 or 25 start levels (350 or 1,250 evaluations), MSE + LPIPS",
        note="features=classifier: 1 - cos of the classifier's penultimate features stands in for LPIPS"),
    DiffusionDetector(
        "lmd", "LMD: the median over alternating checkerboard masks of the distance between the input and its "
        "diffusion inpainting", "squared intensity on [0, 1] (distance mse)", FIT_NONE,
        defaults={"repetitions": 4, "num_steps": 10, "blocks": 8, "distance": "mse"},
        choices={"distance": ("mse", "features")},
        grid={"repetitions": [2, 4], "num_steps": [5, 10], "distance": ["mse", "features"]},
        cost=lambda p: int(p["repetitions"]) * int(p["num_steps"]), cost_formula="repetitions x num_steps",
        paper=("Unsupervised out-of-distribution detection with diffusion inpainting", "ICML", 2023,
               "https://arxiv.org/abs/2302.10326"), code="https://github.com/zhenzhel/lift_map_detect",
        authors="sub-VP SDE, 1,000 steps, 10 repetitions (10,000 evaluations), LPIPS",
        note="DDIM inpainting with RePaint's replacement; blocks: checkerboard squares per side; distance features: "
        "1 - cos of the classifier's penultimate features"),
    DiffusionDetector(
        "diffpath", "DiffPath-6D: minus the log-likelihood of the six statistics of the DDIM inversion path (sums "
        "of eps, eps^2, eps^3 and of its rate of change) under a Gaussian mixture fitted on InD training images",
        "nats", FIT_TRAIN, defaults={"num_steps": 10}, grid={"num_steps": [5, 10]},
        cost=lambda p: int(p["num_steps"]), cost_formula="num_steps",
        paper=("Out-of-distribution detection with a single unconditional diffusion model", "NeurIPS", 2024,
               "https://arxiv.org/abs/2405.11881"), code="https://github.com/clear-nus/diffpath",
        authors="DDIM inversion, 10 steps (10 evaluations); mixture components {50, 100} x 4 covariance types by "
        "10-fold cross-validation", note="the mixture chosen by 10-fold cross-validation on InD training images"),
    DiffusionDetector(
        "diffpath_1d", "DiffPath-1D: minus the log-density of sqrt(sum (d eps / dt)^2) along the DDIM inversion path "
        "under a Gaussian kernel density of InD training images", "nats", FIT_TRAIN,
        defaults={"num_steps": 10, "bandwidth": 5.0}, grid={"num_steps": [5, 10]},
        cost=lambda p: int(p["num_steps"]), cost_formula="num_steps (shared with diffpath when both run)",
        paper=("Out-of-distribution detection with a single unconditional diffusion model", "NeurIPS", 2024,
               "https://arxiv.org/abs/2405.11881"), code="https://github.com/clear-nus/diffpath",
        authors="the same path, bandwidth 5", note="bandwidth 5 was set for 32x32 RGB; the statistic's scale "
        "differs at other sizes"),
    DiffusionDetector(
        "msma", "MSMA: minus the log-likelihood of the predicted-noise norms at L noise levels under a Gaussian "
        "mixture fitted on InD training images", "nats", FIT_TRAIN, defaults={"levels": 10},
        grid={"levels": [5, 10]}, cost=lambda p: int(p["levels"]), cost_formula="levels",
        paper=("Multiscale score matching for out-of-distribution detection", "ICLR", 2021,
               "https://arxiv.org/abs/2010.13132"), code="https://github.com/ahsanMah/msma",
        authors="NCSN, 10 geometric noise levels (10 evaluations), GMM components 2..20 by 10-fold cross-validation",
        note="on a DDPM: ||eps(x_t, t)|| of the input noised to t (seeded by the sample id), t nearest the "
        "authors' geometric sigmas"),
)

_DIFFUSION: Dict[str, DiffusionDetector] = {d.name: d for d in DIFFUSION_DETECTORS}
(DDPM_OOD, LMD, DIFFPATH, DIFFPATH_1D, MSMA) = (d.name for d in DIFFUSION_DETECTORS)


def diffusion_detector(name: str) -> DiffusionDetector:
    """The table's entry of a diffusion detector; ValueError naming the choices for an unknown name."""
    if name not in _DIFFUSION:
        raise ValueError(f"unknown diffusion detector {name!r}: choose from {', '.join(_DIFFUSION)}")
    return _DIFFUSION[name]


def diffusion_params(name: str, given: Optional[Mapping[str, Any]] = None) -> dict:
    """A diffusion detector's complete params: its defaults updated with ``given``; ValueError naming an unknown
    key."""
    entry, unknown = diffusion_detector(name), [k for k in (given or {}) if k not in diffusion_detector(name).defaults]
    if unknown:
        raise ValueError(f"{name} has no parameter {unknown[0]!r}: its parameters are {', '.join(entry.defaults)}")
    return {**entry.defaults, **(given or {})}


def is_diffusion_detector(column: str) -> bool:
    return column in _DIFFUSION


FUSION_DEFAULT = ("ebo", "vim", "knn")  # fusion_partners' default: diffguard+ebo was chosen on validation splits

_BY_NAME: Dict[str, Detector] = {d.name: d for d in CLASSIFIER_DETECTORS}


def classifier_detector(name: str) -> Detector:
    """The table's entry of a classifier detector; ValueError naming the choices for an unknown name."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown classifier detector {name!r}: choose from {', '.join(names())}")
    return _BY_NAME[name]


def names(runnable_only: bool = False) -> List[str]:
    """Every classifier detector's name, in the table's order (``runnable_only``: those wired to our classifiers)."""
    return [d.name for d in CLASSIFIER_DETECTORS if not (runnable_only and d.unavailable)]


def default_names() -> List[str]:
    """``baselines.detectors``' default: every runnable detector marked default."""
    return [d.name for d in CLASSIFIER_DETECTORS if d.default and not d.unavailable]


def check_names(key: str, given: Sequence[str]) -> None:
    """ValueError for a name ``key`` lists that the table does not know, or whose detector cannot run here."""
    for name in given:
        if name not in _BY_NAME:
            raise ValueError(f"{key} has {name!r}, which is no classifier detector: choose from "
                             f"{', '.join(names(runnable_only=True))}")
        if _BY_NAME[name].unavailable:
            raise ValueError(f"{key} has {name!r}, which cannot run on this project's classifiers: "
                             f"{_BY_NAME[name].unavailable}; drop it")


def hyperparameters(name: str) -> List[str]:
    """The names of a classifier detector's hyperparameters (those of its grid and defaults)."""
    entry = classifier_detector(name)
    return list(dict.fromkeys([*entry.grid, *entry.defaults]))


def is_classifier_detector(column: str) -> bool:
    return column in _BY_NAME
