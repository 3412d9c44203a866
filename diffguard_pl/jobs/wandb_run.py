"""A W&B run that can be found again, and what it read and wrote (lineage).

- Name: ``wandb.name``; the command line names a run after its preset and the keys it changes
  (:meth:`~diffguard_pl.config_shared.RunConfig.from_command_line`).
- Tags: ``wandb.tags`` (the command line adds ``preset:<name>``), then ``benchmark:<data.benchmark>`` and, for
  evaluate.py, ``guidance:<classifier|classifier_free>`` (``diffguard.guidance.mode``: classifier guidance of an
  unconditional model, or classifier-free guidance of a class-conditional one) and ``split:<test|val>`` (not
  with score_folder, which scores InD validation and the folder), for train.py ``task:<task>``.
- Group: ``wandb.group``; null: a shard (``shard=i/n``) is grouped by its run name without the shard item (by
  its output folder's name without a trailing index when the run has no name), so the shards of one evaluation
  show together; another run has no group.
- Job type: ``evaluate``, ``score_folder`` or ``train-<task>``.
- Notes: the unit of the metrics (:func:`units_note`), also said once on the console when the run starts.
- Input artifacts: every model file or folder the run reads (:func:`model_inputs`), each an artifact of type
  ``model`` holding a ``file://`` reference (checksummed, never copied) and named after its path
  (:func:`artifact_name`), the name the training run that exported it gave its output artifact
  (:func:`log_exports`), so W&B links the two. A Hugging Face Hub id (no local path) is left out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from diffguard_pl.config import PROJECT_ROOT, EvalConfig, TrainConfig, parse_shard

SHARD_ITEM = re.compile(r"\s*\bshard=\S+")
TRAILING_INDEX = re.compile(r"[-_.]?(shard)?[-_.]?\d+$")


def job_type(cfg) -> str:
    if isinstance(cfg, TrainConfig):
        return f"train-{cfg.task}"
    return "score_folder" if getattr(cfg, "score_folder", None) is not None else "evaluate"


def run_tags(cfg) -> List[str]:
    """``wandb.tags``, then what the run is (see the module docstring), each once."""
    tags = [*cfg.wandb.tags, f"benchmark:{cfg.data.benchmark}"]
    if isinstance(cfg, TrainConfig):
        tags.append(f"task:{cfg.task}")
    elif isinstance(cfg, EvalConfig):
        tags.append(f"guidance:{cfg.diffguard.guidance.mode}")
        if cfg.score_folder is None:
            tags.append(f"split:{cfg.split}")
    return list(dict.fromkeys(tags))


def run_group(cfg) -> Optional[str]:
    """``wandb.group``; null: a shard's group, the same for every shard of one evaluation (module docstring)."""
    if cfg.wandb.group is not None or parse_shard(getattr(cfg, "shard", None)) is None:
        return cfg.wandb.group
    if cfg.wandb.name:
        return SHARD_ITEM.sub("", cfg.wandb.name).strip() or cfg.wandb.name
    folder = Path(cfg.output_dir).resolve().name
    return TRAILING_INDEX.sub("", folder) or folder


def units_note(cfg) -> str:
    """The unit of the run's metrics, as the run's notes and the console say it."""
    if isinstance(cfg, TrainConfig):
        return ("metrics as fractions (0-1): accuracies as the console's summary prints them; losses as "
                "computed")
    return ("metrics as fractions (0-1): AUROC, FPR@95, AUPR, InD accuracy and the rates, which the console's "
            "table prints in %; PSNR in dB")


def init_arguments(cfg) -> dict:
    """``wandb.init``'s arguments that make the run findable: name, tags, group, job type and notes."""
    return {"name": cfg.wandb.name, "tags": run_tags(cfg), "group": run_group(cfg), "job_type": job_type(cfg),
            "notes": units_note(cfg)}


def model_inputs(cfg) -> List[Tuple[str, str]]:
    """(config key, path) of every model (or, for train.py, checkpoint) the run reads; the keys the models'
    loading reads (diffguard_pl/models/loading.py, diffguard_pl/jobs/train_job.py)."""
    if isinstance(cfg, TrainConfig):
        reads = [("resume", cfg.resume)]
        if cfg.task in ("classifier", "cotrain", "joint"):
            reads.append(("classifier.pretrained_path", cfg.classifier.pretrained_path))
        if cfg.task in ("cotrain", "joint"):
            reads.append(("cotrain.diffusion_path", cfg.cotrain.diffusion_path))
        return [(key, path) for key, path in reads if path is not None]
    from diffguard_pl.method.scores import CONTRASTIVE

    m, d = cfg.models, cfg.diffusion_detectors
    reads = [("models.classifier", m.classifier), ("models.diffusion", m.diffusion)]
    if CONTRASTIVE in cfg.diffguard.distances and m.encoder is not None:
        reads.append(("models.encoder", m.encoder))
    if d.names and d.model is not None and d.model != m.diffusion:
        reads.append(("diffusion_detectors.model", d.model))
    return reads


def artifact_name(path) -> str:
    """An artifact name for a model at ``path``: its path inside the project (``checkpoints-fashion-classifier``),
    else its last three parts, in the characters W&B allows."""
    resolved = Path(path).expanduser().resolve()
    try:
        parts = resolved.relative_to(PROJECT_ROOT.resolve()).parts
    except ValueError:
        parts = resolved.parts[-3:]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).strip("-.")[-128:]


def log_inputs(run, cfg) -> List[str]:
    """Declare the models the run reads as its input artifacts (module docstring); returns their names.

    W&B declares a new (draft) artifact as an input with ``run.use_artifact``, which refuses offline runs; its
    offline equivalent is the record ``use_artifact`` itself writes online for a draft (``_log_artifact`` with
    ``use_after_commit``), which ``wandb sync`` commits and then marks as used by the run."""
    import wandb

    names = []
    for key, path in model_inputs(cfg):
        if not Path(path).exists():  # a Hub id, resolved in the local Hub cache
            continue
        artifact = wandb.Artifact(artifact_name(path), type="checkpoint" if key == "resume" else "model",
                                  description=f"read by this run as {key}", metadata={"key": key, "path": str(path)})
        artifact.add_reference(Path(path).resolve().as_uri())
        if run.offline:
            run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(artifact)
        names.append(artifact.name)
    return names


def log_exports(run, folders: Mapping[str, Path], task: str) -> Dict[str, str]:
    """The exported model folders as output artifacts of type ``model`` (copied, as W&B uploads them), each named
    by :func:`artifact_name`; ``folders``: the evaluate.py key that loads each -> its folder. Returns key -> name."""
    import wandb

    names = {}
    for key, folder in folders.items():
        artifact = wandb.Artifact(artifact_name(folder), type="model", description=f"exported by train.py "
                                  f"task={task}; evaluate.py {key}=<its folder> reads it",
                                  metadata={"key": key, "task": task, "path": str(folder)})
        artifact.add_dir(str(folder))
        run.log_artifact(artifact)
        names[key] = artifact.name
    return names


def start(logger, cfg) -> None:
    """Once the W&B run exists (on the process that logs): declare its inputs and say on the console which run
    it is and the unit of its metrics."""
    import wandb

    run = logger.experiment
    if not isinstance(run, wandb.Run):  # another process of a multi-process run: Lightning's stand-in
        return
    inputs = log_inputs(run, cfg)
    group = run_group(cfg)
    print(f"W&B: run {run.name!r} ({job_type(cfg)}{', group ' + repr(group) if group else ''}; tags "
          f"{', '.join(run_tags(cfg))}; inputs {', '.join(inputs) or 'none'}); {units_note(cfg)}", flush=True)
