"""The evaluation job behind ``evaluate.py``: checks, models, data, the Lightning run, outputs.

Stages, in the order that makes a mistake cost least: (1) the config's own checks (done when it was
parsed); (2) the output folder, made and probed for writing; (3) the data's files and packages; (4) the
models, then every check that needs only their shapes; (5) the data; (6) resume: finished samples are read
from ``output_dir/records``; (7) the classifier baselines; (8) DiffGuard on every remaining sample, in a
Lightning test loop (one process per device, records appended after every batch); (9) the outputs.

Outputs in ``output_dir``: ``config.yaml``; ``results.json`` (metrics per detector, per OOD set, near / far
means, InD accuracy, the baselines' and oracles' settings, throughput); ``scores.csv`` (one row per sample:
id, set, split, label, prediction, depth, denoiser evaluations and every detector's score); ``records/``
(what resuming and merging read); the callbacks' plots; the logger's files. Ctrl-C or SIGTERM stops the run
after the current model call, keeps every finished batch and says that the same command resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from diffguard_pl import config as config_lib
from diffguard_pl.jobs import records as records_lib
from diffguard_pl.config import EvalConfig, parse_shard
from diffguard_pl.errors import ConfigError, RunInterrupted

BASELINE_CHOICE = "baselines.json"


def prepare_output_dir(path: Path) -> None:
    """Make ``output_dir`` (and its parents) and probe that it takes files; ConfigError naming the fix."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir={path} is a file, not a folder: choose another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output_dir={path} cannot be written ({error.strerror or error}): choose a folder you "
                          f"can write to") from None


def _signal_name(signum: int) -> str:
    return {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(signum, signal.Signals(signum).name)


@contextlib.contextmanager
def interruptible():
    """Turn Ctrl-C and SIGTERM into :class:`RunInterrupted`, raised in the main thread after the current
    operation (a model call), so a scheduler's stop ends the run within seconds."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise RunInterrupted(_signal_name(signum), exit_code=128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _save_baseline_choice(output_dir: Path, fingerprint: str, choice: dict) -> None:
    """Keep the baseline choice beside the records, for a resumed run that fits no baselines."""
    (output_dir / BASELINE_CHOICE).write_text(json.dumps({"fingerprint": fingerprint, "baselines": choice}, indent=2))


def _load_baseline_choice(output_dir: Path, fingerprint: str) -> Optional[dict]:
    try:
        saved = json.loads((output_dir / BASELINE_CHOICE).read_text())
    except (OSError, ValueError):
        return None
    return saved.get("baselines") if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else None


def write_outputs(results: dict, records: dict, groups: dict, output_dir: Path, cfg: EvalConfig, benchmark,
                  logger=None) -> None:
    from diffguard_pl.detectors.results import format_table, write_json, write_scores_csv

    if cfg.data.benchmark not in ("digits", "fashion"):
        from diffguard_pl.data.file_benchmark import data_report

        results["data"] = data_report(benchmark)  # skipped lines / images, grayscale conversions
    if cfg.oracle != "none":
        from diffguard_pl.method.oracle import describe

        results["oracle"] = describe(cfg.oracle)
    write_json(results, output_dir / "results.json")
    write_scores_csv(records, output_dir / "scores.csv", cfg.diffguard.score, cfg.diffguard.reference)
    if logger is not None and type(logger).__name__ == "WandbLogger":
        import wandb

        artifact = wandb.Artifact(f"evaluation-{logger.experiment.id}", type="evaluation")
        for name in ("results.json", "scores.csv", "columns.json", "config.yaml"):
            artifact.add_file(str(output_dir / name))
        logger.experiment.log_artifact(artifact)
    if cfg.score_folder is not None:
        from diffguard_pl.jobs.folder import write_folder_scores

        write_folder_scores(records, output_dir)
        return
    print(format_table(results, groups))
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'scores.csv'}")


def _report_data(benchmark) -> None:
    """Skipped and converted images on the console (results.json counts them too)."""
    if benchmark.name in ("digits", "fashion"):
        return
    from diffguard_pl.data.file_benchmark import data_report

    report = data_report(benchmark)
    if report["skipped"] or report["grayscale_converted"]:
        sets = ", ".join(f"{name} {r['skipped']} skipped / {r['grayscale_converted']} converted"
                         for name, r in report["sets"].items() if r["skipped"] or r["grayscale_converted"])
        print(f"data: {report['skipped']} images or lines skipped (data.on_error=skip), {report['grayscale_converted']} "
              f"grayscale images converted (data.allow_grayscale=true): {sets}")


def evaluate(cfg: EvalConfig, benchmark=None) -> Optional[dict]:
    """Run DiffGuard and the baselines; returns results.json's content on rank 0 (None elsewhere)."""
    output_dir = Path(cfg.output_dir)
    part = parse_shard(cfg.shard)
    if not cfg.dry_run:
        prepare_output_dir(output_dir)
    from diffguard_pl.data import build_benchmark, check_available

    if benchmark is None:
        check_available(cfg.data)

    from diffguard_pl.jobs.eval_data import check_shapes, load_encoder, load_models

    classifier, diffusion = load_models(cfg)
    encoder = load_encoder(cfg)
    check_shapes(cfg, classifier, diffusion, encoder)
    benchmark = benchmark or build_benchmark(cfg.data)
    _report_data(benchmark)
    if cfg.dry_run:
        from diffguard_pl.jobs.plan import print_plan

        print_plan(cfg, benchmark, classifier, diffusion, encoder)
        return None
    with interruptible():
        try:
            return _evaluate(cfg, benchmark, classifier, diffusion, encoder, output_dir, part)
        except RunInterrupted as stop:
            _, finished, _ = records_lib.read_records([output_dir], None, "counting")
            raise RunInterrupted(
                f"interrupted ({stop}): {len(finished):,} finished samples are kept in {output_dir / 'records'}; "
                f"run the same command again to resume", stop.exit_code) from None


def _evaluate(cfg: EvalConfig, benchmark, classifier, diffusion, encoder, output_dir: Path, part) -> Optional[dict]:
    import lightning as L
    from torch.utils.data import ConcatDataset, DataLoader, Subset

    from diffguard_pl.callbacks import EvalProgress, InversionCurveLogger, ReconstructionLogger, ScoreDistributionPlot
    from diffguard_pl.data.sampler import DistributedEvalSampler
    from diffguard_pl.jobs.eval_data import evaluation_sets, fit_classifier_baselines, folder_images, subset_by_id
    from diffguard_pl.jobs.lightning_setup import build_logger, finish_logger, quiet_lightning, trainer_kwargs
    from diffguard_pl.jobs.wandb_report import log_results
    from diffguard_pl.modules.evaluator import DiffGuardEvaluator
    from diffguard_pl.method.pipeline import DiffGuardPipeline
    from diffguard_pl.detectors.results import finalize

    quiet_lightning(cfg.verbose)
    L.seed_everything(cfg.seed, workers=True, verbose=cfg.verbose)
    groups = {} if cfg.score_folder else {name: s.group for name, s in benchmark.ood.items()}
    tree = records_lib.result_config(cfg)
    header = {"fingerprint": records_lib.fingerprint(tree), "config": tree, "groups": groups,
              "score": cfg.diffguard.score, "split": cfg.split, "partners": list(cfg.fusion_partners)}
    if cfg.resume:
        _, finished, torn = records_lib.read_records([output_dir], header)
        if torn:
            print(f"dropped {torn} torn last line(s) of interrupted record files")
    elif records_lib.has_records(output_dir):
        raise ConfigError(f"{output_dir} holds finished samples of an earlier run and resume=false: "
                          f"use another output_dir or delete {output_dir / records_lib.RECORD_DIR}")
    else:
        finished = {}
    config_lib.save(cfg, output_dir / "config.yaml")

    if cfg.score_folder is not None:  # InD validation (for the threshold) and the folder
        sets = [subset_by_id(s, cfg.limit_per_set) for s in (benchmark.val, folder_images(cfg, benchmark))]
    else:
        sets = evaluation_sets(benchmark, cfg.limit_per_set, cfg.split)
    ids = [sample_id for s in sets for sample_id in s.ids]
    wanted = [i for i in range(len(ids)) if part is None or i % part[1] == part[0]]
    todo = [i for i in wanted if ids[i] not in finished]
    previous = records_lib.records_to_columns([finished[ids[i]] for i in wanted if ids[i] in finished])
    if finished:
        print(f"resuming: {len(wanted) - len(todo):,} of {len(wanted):,} samples already finished in {output_dir}")
    partners = list(cfg.fusion_partners)
    if not todo:
        results = finalize(previous, cfg.diffguard.score, groups, cfg.split, 0.0, 0, partners)
        choice = _load_baseline_choice(output_dir, header["fingerprint"])
        if choice is not None:  # saved by the run that fitted the baselines
            results["baselines"] = choice
        write_outputs(results, previous, groups, output_dir, cfg, benchmark)
        return results

    pipeline = DiffGuardPipeline(diffusion, classifier, cfg.diffguard, encoder=encoder)
    print(f"fitting KNN / ViM on {min(len(benchmark.train), cfg.baselines.train_samples or len(benchmark.train)):,} "
          f"InD training images (k and dim chosen on validation splits)", flush=True)
    stats, choice = fit_classifier_baselines(classifier, benchmark, cfg)
    dataset = Subset(ConcatDataset(sets), todo)
    loader = DataLoader(dataset, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                        sampler=DistributedEvalSampler(len(dataset)))  # each sample on exactly one process
    evaluator = DiffGuardEvaluator(pipeline, stats, groups, oracle=cfg.oracle, split=cfg.split, previous=previous,
                                   record_header=header, output_dir=str(output_dir), partners=partners)
    c = cfg.callbacks
    callbacks = [EvalProgress()] if cfg.trainer.enable_progress_bar else []
    callbacks += [InversionCurveLogger()] if c.curves else []
    callbacks += ([ReconstructionLogger(c.reconstructions, c.reconstruction_select, cfg.diffguard.score,
                                        benchmark.class_names)] if c.reconstructions > 0 else [])
    callbacks += [ScoreDistributionPlot()] if c.score_plots else []
    logger = build_logger(cfg, output_dir, metrics_footer=False)
    if cfg.logger == "wandb":  # the run's config: the resolved config, as config.yaml holds it
        from omegaconf import OmegaConf

        logger.log_hyperparams(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    started = time.perf_counter()
    try:
        trainer = L.Trainer(**{**trainer_kwargs(cfg.trainer), "enable_progress_bar": False}, logger=logger,
                            callbacks=callbacks, inference_mode=False,  # classifier guidance needs gradients
                            use_distributed_sampler=False,  # DistributedEvalSampler instead: no padded duplicates
                            default_root_dir=cfg.output_dir, enable_checkpointing=False, enable_model_summary=False)
        trainer.test(evaluator, dataloaders=loader, verbose=False)
        results = evaluator.results
        if trainer.is_global_zero:
            from diffguard_pl.jobs.profiling import describe_machine

            took = time.perf_counter() - started
            machine = describe_machine(pipeline.device)  # speeds differ by machine: say how fast this one is
            results["throughput"].update(wall_seconds=took, machine=machine)
            log_results(logger, results)
            logger.save()
            results["baselines"] = choice
            _save_baseline_choice(output_dir, header["fingerprint"], choice)
            write_outputs(results, evaluator.all_records, groups, output_dir, cfg, benchmark, logger)
            print(f"took {took:.0f} s on {machine['device']} with {machine['threads']} threads, whose fp32 matrix "
                  f"products run at {machine['fp32_matmul_gflops']:.0f} GFLOP/s (measured after the run)")
    finally:
        finish_logger(logger)
    return results if trainer.is_global_zero else None
