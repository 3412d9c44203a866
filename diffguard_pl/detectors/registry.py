"""Every detector's name, in one table: DiffGuard's score columns, the detectors derived from them, and the
classifier detectors (ours and pytorch-ood's) with what each reads and needs, its hyperparameter grid and its paper.

Config validation (``baselines.detectors``, ``fusion_partners``), ``--help`` (their defaults), the Python API
(``Baseline(name, ...)``), the evaluator, results.json / columns.json and the fused detectors read this table; no
other module writes a detector's name. docs/detectors.md holds :func:`markdown_table` (a test keeps them equal).

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

# ------------------------------------------------------------------------------------------------ DiffGuard columns

DIFFGUARD = "diffguard"  # the configured distance (diffguard.score)
ORACLE_PREFIX = "oracle-"  # oracle-<mode>/<detector>
AGAINST_INPUT = "@input"  # diffguard/<distance>@input: the synthesis against the input, with reference=unguided
FUSED_SEPARATOR = "+"  # diffguard+<classifier detector>


def distance_column(distance: str, against_input: bool = False) -> str:
    """The column of DiffGuard with one distance (``against_input``: the synthesis against the input in a run
    whose reference is the unguided reconstruction)."""
    return f"{DIFFGUARD}/{distance}{AGAINST_INPUT if against_input else ''}"


def fused_column(partner: str) -> str:
    """The column of DiffGuard fused with a classifier detector."""
    return f"{DIFFGUARD}{FUSED_SEPARATOR}{partner}"


def fused_partner(column: str) -> Optional[str]:
    """The classifier detector a fused column combines with DiffGuard; None for any other column."""
    prefix = DIFFGUARD + FUSED_SEPARATOR
    return column[len(prefix):] if column.startswith(prefix) else None


def oracle_column(mode: str, detector: str) -> str:
    """The column of a detector's oracle variant."""
    return f"{ORACLE_PREFIX}{mode}/{detector}"


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


def _vim_grid(sizes: Sizes) -> List[int]:
    from diffguard_pl.detectors.baselines import default_vim_grid

    return default_vim_grid(sizes.features)


def _vim_default(sizes: Sizes) -> int:
    from diffguard_pl.detectors.baselines import default_vim_dim

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


def paper(entry: Detector) -> Optional[tuple]:
    """(title, venue, year, url) of the paper that introduced a detector, from pytorch-ood's ``info`` (imports
    pytorch-ood); None for a detector no single paper introduced."""
    if not entry.paper_class:
        return None
    import importlib

    module, _, cls = entry.paper_class.rpartition(".")
    found = getattr(getattr(importlib.import_module(module), cls).info, "paper", None)
    return None if found is None else (found.title, found.venue, found.year, found.url)


def markdown_table() -> str:
    """The table of classifier detectors as Markdown (docs/detectors.md), with each one's paper (imports
    pytorch-ood)."""
    import importlib

    rows = ["| name | reads | needs | fit on InD train | grid (source) | runs by default | implementation | paper |",
            "|---|---|---|---|---|---|---|---|"]
    for d in CLASSIFIER_DETECTORS:
        module, _, cls = d.implementation.rpartition(".")
        fits = getattr(getattr(importlib.import_module(module), cls), "requires_fit", False)
        grid = ", ".join(f"{k}: {'by feature width' if callable(v) else list(v)}" for k, v in d.grid.items())
        found = paper(d)
        cite = f"[{found[0]}]({found[3]}) ({found[1]} {found[2]})" if found else "-"
        needs = ", ".join(sorted(d.needs)) or "-"
        what = f"{d.implementation.replace('diffguard_pl.detectors.', '')}"
        if d.unavailable:
            what += f"; **not run**: {d.unavailable}"
        elif d.note:
            what += f"; {d.note}"
        default = "yes" if d.default and not d.unavailable else "no"
        rows.append(f"| `{d.name}` | {d.reads} | {needs} | {'yes' if fits else 'no'} | "
                    f"{grid + f' ({d.grid_source})' if grid else '-'} | {default} | {what} | {cite} |")
    return "\n".join(rows)
