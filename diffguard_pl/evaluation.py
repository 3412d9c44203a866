"""Build an evaluation from an :class:`EvalConfig` and run it (``evaluate.py``).

Outputs in ``cfg.output_dir``: ``config.yaml``, ``results.json`` (metrics per
detector, per OOD set, near / far means, InD accuracy, throughput),
``scores.csv`` (one row per sample: id, set, split, label, prediction, depth,
UNet evaluations and every detector's score) and the logger's files.
results.json's ``baselines`` records how KNN's k and ViM's dim were chosen
(``diffguard_pl.baselines.tune_baselines``); a copy in ``baselines.json`` lets
a resumed run with nothing left to compute (which fits no baselines) record it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset

from callbacks import InversionCurveLogger, ReconstructionLogger, ScoreDistributionPlot
from diffguard_pl import config as config_lib
from diffguard_pl import shards
from diffguard_pl.baselines import BaselineStats, tune_baselines
from diffguard_pl.config import ConfigError, EvalConfig
from diffguard_pl.data import Benchmark, ImageSet, build_benchmark, sample_seed
from diffguard_pl.data.sampler import ShardSampler
from diffguard_pl.models import Classifier, ClassifierSpec, DiffusionModel, build_classifier, load_classifier, load_diffusion
from diffguard_pl.modules.evaluator import DiffGuardEvaluator
from diffguard_pl.pipeline import DiffGuardPipeline
from diffguard_pl.results import finalize, format_table, write_json, write_scores_csv
from diffguard_pl.training import build_logger, finish_logger, trainer_kwargs


def load_models(cfg: EvalConfig, benchmark: Benchmark) -> tuple[Classifier, DiffusionModel]:
    """The classifier (portable folder, or weights file + ``models.classifier_*``) and the diffusion model."""
    m = cfg.models
    path = Path(m.classifier)
    if path.is_file():
        if m.classifier_arch is None:
            raise ConfigError(f"models.classifier={path} is a weights file: set models.classifier_arch "
                              f"(a timm name, e.g. resnet50 or openood_resnet18_32x32)")
        channels = benchmark.channels
        spec = ClassifierSpec(
            arch=m.classifier_arch, num_classes=benchmark.num_classes, in_chans=channels,
            input_size=m.classifier_input_size or benchmark.resolution,
            mean=list(m.classifier_mean) if m.classifier_mean is not None else [0.5] * channels,
            std=list(m.classifier_std) if m.classifier_std is not None else [0.5] * channels,
            view=m.classifier_view,
        )
        classifier = build_classifier(spec, path).eval()
    else:
        classifier = load_classifier(path)
    if classifier.spec.num_classes != benchmark.num_classes:
        raise ConfigError(f"the classifier at {path} has {classifier.spec.num_classes} classes but benchmark "
                          f"{benchmark.name} has {benchmark.num_classes}: check models.classifier / data.benchmark")
    diffusion = load_diffusion(m.diffusion, m.diffusion_num_classes, m.diffusion_null_class)
    return classifier, diffusion


def baseline_train_subset(train: ImageSet, limit: Optional[int], seed: int = 0):
    """At most ``limit`` InD train samples, chosen by the hash of their ids (independent of order and count)."""
    if limit is None or len(train) <= limit:
        return train
    order = sorted(range(len(train)), key=lambda i: sample_seed(train.ids[i], seed))
    return train.subset(sorted(order[:limit]))


@torch.no_grad()
def classifier_outputs(classifier: Classifier, image_set, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's (logits [N, C], features [N, D]) on a set, float32 on its device (N may be 0)."""
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    logits, feats = [], []
    if image_set is not None and len(image_set) > 0:
        loader = DataLoader(image_set, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
        for batch in loader:
            lo, fe = classifier.forward_with_features(batch["image"].to(device))
            logits.append(lo.float())
            feats.append(fe.float())
    if not logits:
        head = classifier.model.get_classifier()
        return head.weight.new_zeros(0, head.weight.shape[0]), head.weight.new_zeros(0, head.weight.shape[1])
    return torch.cat(logits), torch.cat(feats)


@torch.no_grad()
def fit_classifier_baselines(classifier: Classifier, benchmark: Benchmark,
                             cfg: EvalConfig) -> tuple[BaselineStats, dict]:
    """KNN / ViM statistics from the classifier's features on the InD training split, k and dim tuned on validation.

    KNN's k and ViM's dim are chosen by ``tune_baselines`` on the InD validation split against the pooled
    ``val`` splits of every OOD set (all their samples: ``limit_per_set`` does not apply, so the choice, like the
    scores it shapes, depends only on the fingerprinted config). Test splits are never used. Returns the
    statistics and the choice recorded in results.json under ``baselines``.
    """
    subset = baseline_train_subset(benchmark.train, cfg.baselines.train_samples, cfg.data.seed)
    train_logits, train_feats = classifier_outputs(classifier, subset, cfg)
    val_ind = classifier_outputs(classifier, benchmark.val, cfg)
    ood_parts = [classifier_outputs(classifier, s.val, cfg) for s in benchmark.ood.values()]
    val_ood = (torch.cat([lo for lo, _ in ood_parts] or [val_ind[0][:0]]),
               torch.cat([fe for _, fe in ood_parts] or [val_ind[1][:0]]))
    head = classifier.model.get_classifier()
    b = cfg.baselines
    try:
        return tune_baselines(
            train_feats, train_logits, head.weight, head.bias, val_ind, val_ood,
            knn_grid=b.knn_k_grid, vim_grid=b.vim_dim_grid, knn_k=b.knn_k, vim_dim=b.vim_dim,
        )
    except ValueError as error:
        if "baselines." in str(error):
            raise ConfigError(str(error)) from error
        raise


BASELINE_CHOICE = "baselines.json"


def save_baseline_choice(output_dir: Path, fingerprint: str, choice: dict) -> None:
    """Keep the baseline choice next to the shards, for a resumed run that fits no baselines."""
    (output_dir / BASELINE_CHOICE).write_text(json.dumps({"fingerprint": fingerprint, "baselines": choice}, indent=2))


def load_baseline_choice(output_dir: Path, fingerprint: str) -> Optional[dict]:
    """The saved baseline choice of a run with the same fingerprint, or None."""
    path = output_dir / BASELINE_CHOICE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("baselines") if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else None


def evaluation_sets(benchmark: Benchmark, limit: Optional[int], split: str = "test") -> list[ImageSet]:
    """InD validation (for the fused detector's normalisation) and every set's ``split`` split."""
    if split == "val":
        sets = [benchmark.val] + [s.val for s in benchmark.ood.values()]
    else:
        sets = [benchmark.val, benchmark.test] + [s.test for s in benchmark.ood.values()]
    return [limited(s, limit) for s in sets]


def limited(image_set: ImageSet, limit: Optional[int]) -> ImageSet:
    """The first ``limit`` samples of a set (all with None)."""
    return image_set if limit is None or len(image_set) <= limit else image_set.subset(range(limit))


def headline_metrics(results: dict) -> dict:
    """Flat metrics for the logger: accuracy, throughput and near / far AUROC and FPR@95 per detector."""
    flat = {"id_accuracy": results["id_accuracy"], **{f"throughput/{k}": v for k, v in results["throughput"].items()}}
    for name, entry in results["detectors"].items():
        for group in ("near", "far"):
            for key, value in entry[group].items():
                flat[f"{name}/{group}_{key}"] = value
    return flat


def build_callbacks(cfg: EvalConfig) -> list:
    c = cfg.callbacks
    callbacks = [InversionCurveLogger()] if c.curves else []
    callbacks += [ReconstructionLogger(c.reconstructions)] if c.reconstructions > 0 else []
    callbacks += [ScoreDistributionPlot()] if c.score_plots else []
    return callbacks


def build_trainer(cfg: EvalConfig, logger) -> L.Trainer:
    return L.Trainer(
        **trainer_kwargs(cfg.trainer),
        logger=logger,
        callbacks=build_callbacks(cfg),
        inference_mode=False,  # classifier guidance needs gradients
        use_distributed_sampler=False,  # ShardSampler instead: no padded duplicates
        default_root_dir=cfg.output_dir,
        enable_checkpointing=False,
    )


def write_outputs(results: dict, records: dict, groups: dict, output_dir: Path, cfg: EvalConfig,
                  benchmark: Benchmark) -> None:
    if cfg.data.benchmark != "digits":
        from diffguard_pl.data.files import data_report

        results["data"] = data_report(benchmark)  # skipped lines / images, grayscale conversions
    if cfg.oracle != "none":
        from diffguard_pl.oracle import describe

        results["oracle"] = describe(cfg.oracle)
    write_json(results, output_dir / "results.json")
    write_scores_csv(records, output_dir / "scores.csv")
    if cfg.score_folder is not None:
        from diffguard_pl.folder import write_folder_scores

        write_folder_scores(records, output_dir)
        return
    print(format_table(results, groups))
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'scores.csv'}")


def folder_images(cfg: EvalConfig, benchmark: Benchmark):
    """The images of ``score_folder`` as one unlabelled set, preprocessed like the benchmark's."""
    from diffguard_pl.data.datamodule import file_transform
    from diffguard_pl.data.files import folder_set, standard_transform

    transform = (standard_transform("resize", cfg.data.resolution) if cfg.data.benchmark == "digits"
                 else file_transform(cfg.data))
    return folder_set(cfg.score_folder, "folder", transform=transform, channels=benchmark.channels,
                      resolution=cfg.data.resolution, convert_grayscale=cfg.data.allow_grayscale or benchmark.channels == 1,
                      on_error=cfg.data.on_error, verify_files=cfg.data.verify_files, workers=cfg.data.decode_workers)


def evaluate(cfg: EvalConfig, benchmark: Optional[Benchmark] = None) -> Optional[dict]:
    """Run DiffGuard and the baselines; returns results.json's content on rank 0 (None elsewhere).

    Finished samples are appended to ``output_dir/shards`` after every batch;
    running again with the same config skips them (``resume=true``).
    """
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    benchmark = benchmark or build_benchmark(cfg.data)
    classifier, diffusion = load_models(cfg, benchmark)
    if cfg.dry_run:
        from diffguard_pl.plan import print_plan

        print_plan(cfg, benchmark, classifier, diffusion)
        return None
    groups = {} if cfg.score_folder else {name: s.group for name, s in benchmark.ood.items()}
    tree = shards.result_config(cfg)
    header = {"fingerprint": shards.fingerprint(tree), "config": tree, "groups": groups,
              "score": cfg.diffguard.score, "split": cfg.split}
    if cfg.resume:
        finished, torn = shards.load_finished(output_dir, header)
        if torn:
            print(f"dropped {torn} torn last line(s) of interrupted shard files")
    elif any((output_dir / shards.SHARD_DIR).glob("*.jsonl")):
        raise ConfigError(f"{output_dir} holds finished samples of an earlier run and resume=false: "
                          f"use another output_dir or delete {output_dir / shards.SHARD_DIR}")
    else:
        finished = {}
    config_lib.save(cfg, output_dir / "config.yaml")

    if cfg.score_folder is not None:  # InD validation (for the threshold) and the folder
        sets = [limited(s, cfg.limit_per_set) for s in (benchmark.val, folder_images(cfg, benchmark))]
    else:
        sets = evaluation_sets(benchmark, cfg.limit_per_set, cfg.split)
    ids = [sample_id for s in sets for sample_id in s.ids]
    part = shards.parse_shard(cfg.shard)
    wanted = [i for i in range(len(ids)) if part is None or i % part[1] == part[0]]
    todo = [i for i in wanted if ids[i] not in finished]
    previous = shards.records_to_columns([finished[ids[i]] for i in wanted if ids[i] in finished])
    if finished:
        print(f"resuming: {len(wanted) - len(todo)} of {len(wanted)} samples already finished in {output_dir}")
    if not todo:
        results = finalize(previous, cfg.diffguard.score, groups, cfg.split, 0.0, 0)
        choice = load_baseline_choice(output_dir, header["fingerprint"])
        if choice is not None:  # saved by the run that fitted the baselines; absent for older runs
            results["baselines"] = choice
        write_outputs(results, previous, groups, output_dir, cfg, benchmark)
        return results

    pipeline = DiffGuardPipeline(diffusion, classifier, cfg.diffguard)
    stats, choice = fit_classifier_baselines(classifier, benchmark, cfg)
    dataset = Subset(ConcatDataset(sets), todo)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.eval_batch_size,
        sampler=ShardSampler(len(dataset)),  # each sample on exactly one process, no padding
        num_workers=cfg.data.num_workers,
    )
    evaluator = DiffGuardEvaluator(pipeline, stats, groups, oracle=cfg.oracle, split=cfg.split,
                                   previous=previous, shard_header=header, output_dir=str(output_dir))
    logger = build_logger(cfg, output_dir)
    try:
        trainer = build_trainer(cfg, logger)
        trainer.test(evaluator, dataloaders=loader, verbose=False)
        results = evaluator.results
        if trainer.is_global_zero:
            logger.log_metrics(headline_metrics(results))
            logger.save()
    finally:
        finish_logger(logger)
    if not trainer.is_global_zero:
        return None
    results["baselines"] = choice
    save_baseline_choice(output_dir, header["fingerprint"], choice)
    write_outputs(results, evaluator.all_records, groups, output_dir, cfg, benchmark)
    return results
