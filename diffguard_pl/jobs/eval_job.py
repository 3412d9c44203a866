"""The evaluation job behind ``evaluate.py``, in stages ordered so that a mistake costs least.

1. checks that need neither data nor models: the config (parsed before this runs), ``score_folder``'s images
   (every one decoded: a bad file is refused here, or named and left out with data.on_error=skip), the data's
   files, the models' files and the shapes their configs declare;
2. the data; ``score_folder``: enough InD validation images for its thresholds;
3. the models' weights and the checks that need them: the classifier's accuracy on InD validation images
   (another benchmark's classifier is refused, diffguard_pl/detectors/classifier_check.py); a dry run prints the
   plan and stops here;
4. the output folder (one run at a time), and what an earlier run finished there (resume: the record store,
   diffguard_pl/records/store.py);
5. the classifier baselines and the diffusion detectors' mixtures, fitted on InD training images (features and
   statistics cached: diffguard_pl/detectors/features.py, diffguard_pl/detectors/diffusion_fitting.py);
6. the loop detectors (DiffGuard, the classifier detectors, the diffusion detectors:
   diffguard_pl/detectors/loop.py) on every sample left, in a Lightning test loop (records appended after
   every batch);
7. the report: every record (this run's and earlier runs') to every output (diffguard_pl/jobs/report.py, also
   what a resumed run with nothing left and a merge of shards call).

Outputs in ``output_dir``: ``config.yaml``; ``results.json``; ``scores.csv``; ``records/`` (what resuming and
merging read); the callbacks' plots; the logger's files. Ctrl-C or SIGTERM stops the run after the current model
call, keeps every finished batch and says that the same command resumes. Nothing is written before every
check of stages 1-3 has passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig, parse_shard
from diffguard_pl.errors import ConfigError, RunInterrupted
from diffguard_pl.records import store as records_lib


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


@dataclass
class Models:
    classifier: object
    diffusion: object
    encoder: object = None  # the contrastive distance's encoder, when that distance is asked for
    detector_diffusion: object = None  # the diffusion detectors' model, when any runs


def check_shapes(cfg: EvalConfig, classifier, diffusion, encoder=None) -> None:
    """What needs the loaded models (e.g. a conditional model's classes, its null class for classifier-free
    guidance); ConfigError naming the key and the fix. ``check_model_files`` ran before the weights loaded."""
    from diffguard_pl.method.pipeline import check_models

    try:
        check_models(diffusion, classifier, cfg.diffguard, encoder)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _report_data(benchmark) -> Optional[dict]:
    """Skipped and converted images of a file benchmark on the console (counts per set, then the skipped lines
    and files by name); returns results.json's ``data`` (every problem listed), None for the embedded benchmarks."""
    if benchmark.name in ("digits", "fashion"):
        return None
    from diffguard_pl.data.file_benchmark import data_report
    from diffguard_pl.jobs.folder import MAX_NAMED

    report = data_report(benchmark)
    if report["skipped"] or report["grayscale_converted"]:
        sets = ", ".join(f"{name} {r['skipped']} skipped / {r['grayscale_converted']} converted"
                         for name, r in report["sets"].items() if r["skipped"] or r["grayscale_converted"])
        print(f"data: {report['skipped']} images or lines skipped (data.on_error=skip), {report['grayscale_converted']} "
              f"grayscale images converted (data.allow_grayscale=true): {sets}")
        problems = [p for r in report["sets"].values() for p in r["problems"]]
        for p in problems[:MAX_NAMED]:
            print(f"  skipped {p['file']}" + (f":{p['line']}" if p["line"] is not None else "") + f": {p['reason']}")
        if len(problems) > MAX_NAMED:
            print(f"  ... and {len(problems) - MAX_NAMED} more (results.json's data.sets.*.problems lists them all)")
    return report


def evaluate(cfg: EvalConfig, benchmark=None) -> Optional[dict]:
    """Run DiffGuard and the baselines; returns results.json's content on rank 0 (None elsewhere, and for a
    dry run)."""
    started = time.perf_counter()
    output_dir = Path(cfg.output_dir)
    part = parse_shard(cfg.shard)
    # 1. what needs neither data nor models
    folder_report = None
    if cfg.score_folder is not None:
        from diffguard_pl.jobs.folder import describe_conversions, inspect_folder

        folder_report = inspect_folder(cfg.score_folder, cfg.data)
        print(describe_conversions(folder_report))
    from diffguard_pl.data import build_benchmark, check_available
    from diffguard_pl.models.loading import check_model_files

    if benchmark is None:
        check_available(cfg.data)
    check_model_files(cfg)
    # 2. the data
    benchmark = benchmark or build_benchmark(cfg.data)
    data_report = _report_data(benchmark)
    if cfg.score_folder is not None:
        from diffguard_pl.jobs.folder import check_validation_count

        check_validation_count(len(benchmark.val), cfg.limit_per_set)
    # 3. the models
    from diffguard_pl.models.loading import load_detector_diffusion, load_encoder, load_models

    classifier, diffusion = load_models(cfg)
    models = Models(classifier, diffusion, load_encoder(cfg), load_detector_diffusion(cfg, diffusion))
    check_shapes(cfg, classifier, diffusion, models.encoder)
    if models.detector_diffusion is not None:  # a parameter the model cannot run with: refused before any work
        from diffguard_pl.detectors.diffusion_fitting import build_diffusion_detectors

        build_diffusion_detectors(cfg, models.detector_diffusion, classifier)
    from diffguard_pl.detectors.classifier_check import check_classifier

    classifier_check = check_classifier(cfg, classifier, benchmark)  # another benchmark's classifier: refused here
    if cfg.dry_run:
        from diffguard_pl.jobs.plan import print_plan

        print_plan(cfg, benchmark, classifier, diffusion, models.encoder, models.detector_diffusion, folder_report)
        return None
    # 4. onwards: the run
    prepare_output_dir(output_dir)
    if cfg.score_folder is not None:
        print(f"score_folder: writing to {output_dir} (output_dir=DIR sets another folder)")
    with interruptible():
        try:
            return _evaluate(cfg, benchmark, models, output_dir, part, (folder_report, data_report, classifier_check),
                             started)
        except RunInterrupted as stop:
            _, finished, _ = records_lib.read_records([output_dir], None, "counting")
            raise RunInterrupted(
                f"interrupted ({stop}): {len(finished):,} finished samples are kept in {output_dir / 'records'}; "
                f"run the same command again to resume", stop.exit_code) from None


def evaluation_work(cfg: EvalConfig, benchmark, output_dir: Path, part) -> tuple[list, records_lib.Work]:
    """The sets this run scores and what is left of them in ``output_dir`` (stage 4)."""
    from diffguard_pl.data.selection import evaluation_sets, folder_images, subset_by_id

    if cfg.score_folder is not None:  # InD validation (for the thresholds) and the whole folder
        folder = folder_images(cfg, benchmark)
        sets = [subset_by_id(benchmark.val, cfg.limit_per_set), subset_by_id(folder, cfg.score_folder_limit)]
        if len(sets[1]) < len(folder):
            print(f"score_folder: scoring {len(sets[1]):,} of its {len(folder):,} images (score_folder_limit="
                  f"{cfg.score_folder_limit}, chosen by id hash)")
        groups = {}
    else:
        sets = evaluation_sets(benchmark, cfg.limit_per_set, cfg.split)
        groups = {name: s.group for name, s in benchmark.ood.items()}
    tree = records_lib.result_config(cfg)
    header = {"fingerprint": records_lib.fingerprint(tree), "config": tree, "groups": groups,
              "score": cfg.diffguard.score, "split": cfg.split, "partners": list(cfg.fusion_partners)}
    ids = [sample_id for s in sets for sample_id in s.ids]
    work = records_lib.plan_work(header, ids, output_dir, cfg.resume, part)
    if work.torn:
        print(f"dropped {work.torn} torn last line(s) of interrupted record files")
    if len(work.todo) < len(work.wanted):
        print(f"resuming: {len(work.wanted) - len(work.todo):,} of {len(work.wanted):,} samples already finished in "
              f"{output_dir}")
    return sets, work


def _evaluate(cfg: EvalConfig, benchmark, models: Models, output_dir: Path, part, reports: tuple,
              started: float) -> Optional[dict]:
    """Stages 4-7, one run at a time on ``output_dir`` (the record store's lock, held by rank 0 only: the other
    processes of a multi-process run are its own); ``reports``: (the scored folder's, the file benchmark's data
    report, each None if none; the classifier check's numbers)."""
    from diffguard_pl.console import is_rank_zero

    lock = records_lib.RunLock(output_dir) if is_rank_zero() else contextlib.nullcontext()
    with lock:
        return _evaluate_locked(cfg, benchmark, models, output_dir, part, reports, started)


def _evaluate_locked(cfg: EvalConfig, benchmark, models: Models, output_dir: Path, part, reports: tuple,
                     started: float) -> Optional[dict]:
    import lightning as L

    from diffguard_pl.jobs.lightning_setup import build_logger, finish_logger, quiet_lightning
    from diffguard_pl.jobs.report import DIFFUSION_CHOICE, report, save_baseline_choice, throughput

    quiet_lightning(cfg.verbose)
    L.seed_everything(cfg.seed, workers=True, verbose=cfg.verbose)
    config_lib.save(cfg, output_dir / "config.yaml")
    sets, work = evaluation_work(cfg, benchmark, output_dir, part)
    timing = {"images": 0, "loop_seconds": 0.0, "machine": None}
    logger, this_run, listeners = None, (), _report_listeners(cfg)
    try:
        if work.todo:
            from diffguard_pl.detectors.diffusion_fitting import build_diffusion_detectors, fit_diffusion_detectors
            from diffguard_pl.detectors.fitting import fit_classifier_detectors

            classifier_detectors, choice = fit_classifier_detectors(models.classifier, benchmark, cfg)  # stage 5
            save_baseline_choice(output_dir, work.header["fingerprint"], choice)
            diffusion_detectors = (build_diffusion_detectors(cfg, models.detector_diffusion, models.classifier)
                                   if models.detector_diffusion is not None else [])
            if diffusion_detectors:
                save_baseline_choice(output_dir, work.header["fingerprint"],
                                     fit_diffusion_detectors(diffusion_detectors, benchmark, cfg), DIFFUSION_CHOICE)
            logger = build_logger(cfg, output_dir, metrics_footer=False)
            evaluator, trainer = _run_loop(cfg, models, sets, work, (classifier_detectors, diffusion_detectors),
                                           logger, benchmark)  # stage 6
            if not trainer.is_global_zero:
                return None
            from diffguard_pl.profiling.machine import describe_machine

            timing = {"images": evaluator.images, "loop_seconds": evaluator.loop_seconds,
                      "machine": describe_machine(evaluator.pipeline.device)}  # speeds differ by machine
            this_run = evaluator.gathered
            from diffguard_pl.jobs.wandb_samples import sample_tables

            listeners += sample_tables(trainer, cfg.recommended)  # W&B: the grids' samples as a table
        records = records_lib.collect(output_dir, work, this_run)  # stage 7
        timing["wall_seconds"] = time.perf_counter() - started
        from diffguard_pl.jobs.folder import FolderRun

        folder = None if reports[0] is None else FolderRun(reports[0], cfg.recommended, benchmark.class_names)
        if folder is not None:  # the folder's verdict ends the console
            _say_done(throughput(records, **timing))
        results = report(records, work.header, output_dir, timing, listeners=listeners, logger=logger,
                         folder=folder, data_report=reports[1], classifier_check=reports[2])
        if folder is None:
            _say_done(results["throughput"])
        return results
    finally:
        finish_logger(logger)


def _say_done(throughput: dict) -> None:
    wall, machine = throughput["wall_seconds"], throughput.get("machine")
    if machine is None:
        print(f"no sample left to evaluate; took {_seconds(wall)} in all")
        return
    print(f"evaluated {throughput['images']:,} images at {throughput['images_per_second'] or 0:.2f} images/s (test "
          f"loop), {_seconds(wall)} in all, on {machine['device']} with {machine['threads']} threads, whose fp32 "
          f"matrix products run at {machine['fp32_matmul_gflops']:.0f} GFLOP/s (measured after the run)")


def _seconds(seconds: float) -> str:
    from diffguard_pl.console import duration

    return duration(seconds)


def _report_listeners(cfg: EvalConfig) -> list:
    """The callbacks that draw from the finished records (the report calls them)."""
    from diffguard_pl.callbacks import InversionCurveLogger, ScoreDistributionPlot

    listeners = [InversionCurveLogger()] if cfg.callbacks.curves else []
    return listeners + ([ScoreDistributionPlot()] if cfg.callbacks.score_plots else [])


def _run_loop(cfg: EvalConfig, models: Models, sets: list, work: records_lib.Work, fitted: tuple, logger,
              benchmark):
    """Stage 6: the Lightning test loop over the samples left (each on exactly one process); ``fitted``: the
    classifier detectors and the diffusion detectors."""
    import lightning as L
    from torch.utils.data import ConcatDataset, DataLoader, Subset

    from diffguard_pl.callbacks import EvalProgress, ReconstructionLogger
    from diffguard_pl.data.sampler import DistributedEvalSampler
    from diffguard_pl.detectors.loop import ClassifierDetectorsInLoop, DiffGuardInLoop, DiffusionDetectorsInLoop
    from diffguard_pl.jobs.lightning_setup import trainer_kwargs
    from diffguard_pl.method.pipeline import DiffGuardPipeline
    from diffguard_pl.modules.evaluator import DiffGuardEvaluator

    pipeline = DiffGuardPipeline(models.diffusion, models.classifier, cfg.diffguard, encoder=models.encoder)
    dataset = Subset(ConcatDataset(sets), work.todo)
    loader = DataLoader(dataset, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                        sampler=DistributedEvalSampler(len(dataset)))  # each sample on exactly one process
    classifier_detectors, diffusion_detectors = fitted
    detectors = [DiffGuardInLoop(pipeline, cfg.oracle), ClassifierDetectorsInLoop(classifier_detectors)]
    detectors += [DiffusionDetectorsInLoop(diffusion_detectors)] if diffusion_detectors else []
    evaluator = DiffGuardEvaluator(detectors, records_lib.RecordSink(cfg.output_dir, work.header))
    c = cfg.callbacks
    callbacks = [EvalProgress()] if cfg.trainer.enable_progress_bar else []
    callbacks += ([ReconstructionLogger(c.reconstructions, c.reconstruction_select, cfg.diffguard.score,
                                        benchmark.class_names, work.header["groups"],
                                        resumed=len(work.wanted) - len(work.todo))]
                  if c.reconstructions > 0 else [])
    if cfg.logger == "wandb":  # the run's config: the resolved config, as config.yaml holds it
        from omegaconf import OmegaConf

        logger.log_hyperparams(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    trainer = L.Trainer(**{**trainer_kwargs(cfg.trainer), "enable_progress_bar": False}, logger=logger,
                        callbacks=callbacks, inference_mode=False,  # classifier guidance needs gradients
                        use_distributed_sampler=False,  # DistributedEvalSampler instead: no padded duplicates
                        default_root_dir=cfg.output_dir, enable_checkpointing=False, enable_model_summary=False)
    trainer.test(evaluator, dataloaders=loader, verbose=False)
    return evaluator, trainer
