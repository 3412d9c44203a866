"""What an evaluation reads: the models, the sets it scores, and the classifier features the baselines fit on.

No Lightning here: the evaluation job (diffguard_pl/jobs/eval_job.py), the dry run (diffguard_pl/jobs/plan.py) and
the calibration all use these.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from diffguard_pl.config import DataConfig, EvalConfig
from diffguard_pl.detectors.classifier_parts import ClassifierParts, Samples
from diffguard_pl.detectors.tuning import ClassifierDetectors, fit_detectors, label
from diffguard_pl.data import Benchmark, ImageSet, sample_seed
from diffguard_pl.errors import ConfigError
from diffguard_pl.jobs.features import classifier_outputs
from diffguard_pl.jobs.phases import Phase, is_rank_zero
from diffguard_pl.models import Classifier, ClassifierSpec, DiffusionModel, build_classifier, load_classifier
from diffguard_pl.models import load_diffusion


def num_classes(data: DataConfig) -> int:
    """The benchmark's number of InD classes, known from the config alone (nothing is read)."""
    if data.benchmark in ("digits", "fashion"):
        return len(data.ind_classes)
    if data.benchmark == "lists":
        return int(dict(data.definition)["num_classes"])
    from diffguard_pl.data.image_lists import OPENOOD_BENCHMARKS

    return int(OPENOOD_BENCHMARKS[data.benchmark]["num_classes"])


def load_models(cfg: EvalConfig) -> tuple[Classifier, DiffusionModel]:
    """The classifier (portable folder, or weights file + ``models.classifier_*``) and the diffusion model."""
    m, data = cfg.models, cfg.data
    path = Path(m.classifier)
    if path.is_file():
        spec = ClassifierSpec(
            arch=m.classifier_arch, num_classes=num_classes(data), in_chans=data.channels,
            input_size=m.classifier_input_size or data.resolution,
            mean=list(m.classifier_mean) if m.classifier_mean is not None else [0.5] * data.channels,
            std=list(m.classifier_std) if m.classifier_std is not None else [0.5] * data.channels,
            view=m.classifier_view,
        )
        classifier = build_classifier(spec, path).eval()
    else:
        classifier = load_classifier(path)
    diffusion = load_diffusion(m.diffusion, m.diffusion_num_classes, m.diffusion_null_class)
    return classifier, diffusion


def load_encoder(cfg: EvalConfig) -> Optional[Classifier]:
    """The contrastive encoder (``models.encoder``) when ``contrastive`` is among the distances, else None."""
    from diffguard_pl.method.scores import CONTRASTIVE

    if CONTRASTIVE not in cfg.diffguard.distances:
        return None
    if cfg.models.encoder is None:  # check_model_files says so before any model loads
        raise ConfigError(f"diffguard.distances has {CONTRASTIVE!r}, which needs models.encoder")
    return load_classifier(cfg.models.encoder)


def check_model_files(cfg: EvalConfig) -> None:
    """What the models' files and configs say, before any weights load: the folders exist, and the images the
    config makes fit both models (size, channels) and the classifier's classes match the benchmark's;
    MissingCheckpointError / ConfigError naming the key and the fix."""
    from diffguard_pl.models.files import classifier_meta, diffusion_image_shape

    data, m = cfg.data, cfg.models
    channels, size = diffusion_image_shape(m.diffusion)
    if data.resolution != size or data.channels != channels:
        raise ConfigError(
            f"data.resolution={data.resolution} / data.channels={data.channels} do not fit the diffusion model "
            f"{m.diffusion}, which takes {channels}-channel {size}x{size} images: set data.resolution={size} "
            f"data.channels={channels}, or use a model for these images")
    meta = classifier_meta(m.classifier)
    if meta is None:  # a weights file: its shape comes from the config (data.channels, the benchmark's classes)
        if m.classifier_arch is None:
            raise ConfigError(f"models.classifier={m.classifier} is a weights file: set models.classifier_arch "
                              f"(a timm name, e.g. resnet50 or openood_resnet18_32x32)")
        return
    if meta["in_chans"] != data.channels:
        raise ConfigError(
            f"the classifier {m.classifier} takes {meta['in_chans']}-channel images but data.channels="
            f"{data.channels}: use a classifier for {data.channels}-channel images (or data.channels="
            f"{meta['in_chans']} with a diffusion model to match)")
    expected = num_classes(data)
    if meta["num_classes"] != expected:
        raise ConfigError(f"the classifier {m.classifier} has {meta['num_classes']} classes but benchmark "
                          f"{data.benchmark} has {expected}: check models.classifier / data.benchmark")
    if "contrastive" in cfg.diffguard.distances:
        if cfg.models.encoder is None:
            raise ConfigError("diffguard.distances has 'contrastive', which needs models.encoder: a folder made by "
                              "`python train.py --config conf/train_fashion_encoder.yaml` (OUT/encoder), or drop "
                              "'contrastive' from diffguard.distances")
        encoder = classifier_meta(cfg.models.encoder)
        if encoder is not None and encoder["in_chans"] != data.channels:
            raise ConfigError(f"the encoder {cfg.models.encoder} (models.encoder) takes {encoder['in_chans']}-channel "
                              f"images but data.channels={data.channels}: use an encoder trained on these images")


def check_shapes(cfg: EvalConfig, classifier: Classifier, diffusion: DiffusionModel,
                 encoder: Optional[Classifier] = None) -> None:
    """What needs the loaded models (e.g. a conditional model's classes, its null class for classifier-free
    guidance); ConfigError naming the key and the fix. :func:`check_model_files` ran before the weights loaded."""
    from diffguard_pl.method.pipeline import check_models

    try:
        check_models(diffusion, classifier, cfg.diffguard, encoder)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def subset_by_id(image_set: ImageSet, limit: Optional[int], seed: int = 0) -> ImageSet:
    """At most ``limit`` samples of a set, chosen by the hash of their ids: the same samples whatever the
    set's order, the other sets or the number of processes (all with None)."""
    if limit is None or len(image_set) <= limit:
        return image_set
    order = sorted(range(len(image_set)), key=lambda i: sample_seed(image_set.ids[i], seed))
    return image_set.subset(sorted(order[:limit]))


def evaluation_sets(benchmark: Benchmark, limit: Optional[int], split: str = "test") -> List[ImageSet]:
    """InD validation (for the fused detectors' normalisation) and every set's ``split`` split, each limited
    to ``limit`` samples chosen by id hash."""
    if split == "val":
        sets = [benchmark.val] + [s.val for s in benchmark.ood.values()]
    else:
        sets = [benchmark.val, benchmark.test] + [s.test for s in benchmark.ood.values()]
    return [subset_by_id(s, limit) for s in sets if s is not None and len(s) > 0]


def fit_classifier_baselines(classifier: Classifier, benchmark: Benchmark,
                             cfg: EvalConfig) -> tuple[ClassifierDetectors, dict]:
    """The classifier detectors of ``baselines.detectors`` fitted on the InD training split (``baselines.train_samples``
    of it, chosen by id hash), their hyperparameters chosen on validation splits (diffguard_pl/detectors/tuning.py).

    The choice uses the InD validation split against the pooled ``val`` splits of every OOD set (all their
    samples: ``limit_per_set`` does not apply, so the choice depends only on the fingerprinted config). Test
    splits are never used. Prints each detector's choice and cost, and why any was left out. Returns the fitted
    detectors and the choice (results.json's ``baselines``).
    """
    batch, workers = cfg.data.eval_batch_size, cfg.data.num_workers
    train = subset_by_id(benchmark.train, cfg.baselines.train_samples, cfg.data.seed)
    pooled = None
    ood_val = [s.val for s in benchmark.ood.values() if s.val is not None and len(s.val)]
    if ood_val:  # the OOD validation splits as one set (one cache entry, one line on the console)
        pooled = type(ood_val[0]).pooled("ood_val", ood_val, "val")
    sets = {}
    for key, image_set, what in (("train", train, "InD training images"),
                                 ("ind", benchmark.val, "InD validation images"),
                                 ("ood", pooled, "OOD validation images")):
        logits, feats = classifier_outputs(classifier, image_set, batch, workers, what)
        labels = image_set.labels if image_set is not None else torch.zeros(0, dtype=torch.long)
        sets[key] = Samples(logits, feats, labels, image_set, batch)
    names, b = list(cfg.baselines.detectors), cfg.baselines
    with Phase(f"fitting {len(names)} classifier detectors on {len(train):,} InD training images (hyperparameters "
               f"chosen on validation splits)", len(names), unit="detectors") as phase:
        try:
            detectors, choice = fit_detectors(names, ClassifierParts(classifier), sets["train"], sets["ind"],
                                              sets["ood"], b.params, b.grids, progress=lambda _: phase.advance(1))
        except ValueError as error:
            if str(error).startswith("baselines."):
                raise ConfigError(str(error)) from error
            raise
    if is_rank_zero():
        print(describe_choice(choice))
    return detectors, choice


def describe_choice(choice: dict) -> str:
    """One line per classifier detector: its hyperparameters, validation AUROC, seconds to fit and tune, ms per
    image; one line per detector left out, with its reason."""
    lines = [f"{'detector':<10} {'hyperparameters':<44} {'val AUROC':>9} {'fit+tune':>9} {'ms/image':>9}"]
    for name, record in choice.items():
        if name in ("left_out", "validation"):
            continue
        params = label(record["params"]) if record["params"] else "-"
        value = record["val_auroc"].get(label(record["params"]))
        ms = record["ms_per_image"]
        lines.append(f"{name:<10} {params:<44} {'-' if value is None else f'{value:.4f}':>9} "
                     f"{record['seconds']:>8.1f}s {'-' if ms is None else f'{ms:.4f}':>9}")
    lines += [f"{name:<10} left out: {reason}" for name, reason in choice["left_out"].items()]
    return "\n".join(lines)


def folder_images(cfg: EvalConfig, benchmark: Benchmark) -> ImageSet:
    """The images of ``score_folder`` as one unlabelled set, preprocessed like the benchmark's."""
    from diffguard_pl.data.build import file_transform
    from diffguard_pl.data.file_benchmark import folder_set
    from diffguard_pl.data.image_files import standard_transform

    transform = (standard_transform("resize", cfg.data.resolution) if cfg.data.benchmark in ("digits", "fashion")
                 else file_transform(cfg.data))
    return folder_set(cfg.score_folder, "folder", transform=transform, channels=benchmark.channels,
                      resolution=cfg.data.resolution,
                      convert_grayscale=cfg.data.allow_grayscale or benchmark.channels == 1,
                      on_error=cfg.data.on_error, verify_files=cfg.data.verify_files, workers=cfg.data.decode_workers)
