"""The models an evaluation config names: checked from their files before any weights load, then loaded.

No Lightning here: the evaluation job, the dry run, the calibration and the Python API all use these.
"""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path
from typing import Iterator, Optional

from diffguard_pl.config import DataConfig, EvalConfig
from diffguard_pl.errors import ConfigError, DamagedCheckpointError, UserError
from diffguard_pl.models.classifier import Classifier, ClassifierSpec, build_classifier, load_classifier
from diffguard_pl.models.diffusion import DiffusionModel, load_diffusion


def num_classes(data: DataConfig) -> int:
    """The benchmark's number of InD classes, known from the config (for your own data given as class folders:
    the count of sub-folders, listed but not read)."""
    if data.benchmark in ("digits", "fashion"):
        return len(data.ind_classes)
    if data.benchmark == "lists":
        from diffguard_pl.data import definition

        return definition.num_classes(dict(data.definition), data.root)
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
        with weights_of("models.classifier", path):
            classifier = build_classifier(spec, path).eval()
    else:
        with weights_of("models.classifier", path):
            classifier = load_classifier(path)
    with weights_of("models.diffusion", m.diffusion):
        diffusion = load_diffusion(m.diffusion, m.diffusion_num_classes, m.diffusion_null_class)
    return classifier, diffusion


def load_detector_diffusion(cfg: EvalConfig, diffusion: DiffusionModel) -> Optional[DiffusionModel]:
    """The diffusion detectors' model: ``diffusion_detectors.model``, else the main one (``diffusion``); None when
    no diffusion detector runs. A class-conditional model is run with its null class (ConfigError without one)."""
    d = cfg.diffusion_detectors
    if not d.names:
        return None
    if d.model is None:
        model = diffusion
    else:
        with weights_of("diffusion_detectors.model", d.model):
            model = load_diffusion(d.model)
    if model.conditional and model.null_class is None:
        raise ConfigError(f"diffusion_detectors.names={d.names} run an unconditional diffusion model, and "
                          f"{d.model or cfg.models.diffusion} is class-conditional without a null class: set "
                          f"diffusion_detectors.model to an unconditional diffusers folder")
    return model


def load_encoder(cfg: EvalConfig) -> Optional[Classifier]:
    """The contrastive encoder (``models.encoder``) when ``contrastive`` is among the distances, else None."""
    from diffguard_pl.method.scores import CONTRASTIVE

    if CONTRASTIVE not in cfg.diffguard.distances:
        return None
    if cfg.models.encoder is None:  # check_model_files says so before any model loads
        raise ConfigError(f"diffguard.distances has {CONTRASTIVE!r}, which needs models.encoder")
    with weights_of("models.encoder", cfg.models.encoder):
        return load_classifier(cfg.models.encoder)


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@contextlib.contextmanager
def weights_of(key: str, path) -> Iterator[None]:
    """Loading a model's weights: a failure caused by a damaged weights file under ``path`` (truncated, corrupt)
    becomes DamagedCheckpointError naming the file and the fix; any other failure goes on as it is."""
    try:
        yield
    except UserError:
        raise
    except Exception:
        damaged = find_damaged(Path(path))
        if damaged is None:
            raise
        file, why = damaged
        from diffguard_pl.config import PROJECT_ROOT

        committed = file.resolve().is_relative_to(Path(PROJECT_ROOT).resolve() / "checkpoints")
        fix = (f"git checkout -- {file.resolve().relative_to(Path(PROJECT_ROOT).resolve())} restores the committed "
               f"copy" if committed else "restore an intact copy, or re-create the model with train.py "
               "(docs/training.md)")
        raise DamagedCheckpointError(f"{key}={path}: its weights file {file} is damaged ({why}): {fix}") from None


def find_damaged(path: Path) -> Optional[tuple[Path, str]]:
    """(file, why) for the first weights file under ``path`` that cannot be read whole: safetensors files are read
    tensor by tensor, zip-format torch files (.pt / .pth / .bin / .ckpt) checked member by member; None if every
    file reads (or none is of these formats)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        why = _unreadable(file)
        if why:
            return file, why
    return None


def _unreadable(file: Path) -> Optional[str]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():
                    handle.get_tensor(name)
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            return f"{type(error).__name__}: {error}"
        return None
    with open(file, "rb") as handle:
        zipped = handle.read(2) == b"PK"  # torch.save's format since 1.6 is a zip archive
    if not zipped:
        return None
    if not zipfile.is_zipfile(file):
        return "a torch zip archive without its end: truncated"
    with zipfile.ZipFile(file) as archive:
        bad = archive.testzip()
    return f"member {bad} is corrupt" if bad else None


def check_model_files(cfg: EvalConfig) -> None:
    """What the models' files and configs say, before any weights load: the folders exist, and the images the
    config makes fit both models (size, channels) and the classifier's classes match the benchmark's;
    MissingCheckpointError / ConfigError naming the key and the fix."""
    from diffguard_pl.models.files import classifier_meta, diffusion_image_shape

    data, m = cfg.data, cfg.models
    models = [("models.diffusion", m.diffusion)]
    if cfg.diffusion_detectors.names and cfg.diffusion_detectors.model is not None:
        models.append(("diffusion_detectors.model", cfg.diffusion_detectors.model))
    for key, path in models:
        channels, size = diffusion_image_shape(path)
        if data.resolution != size or data.channels != channels:
            raise ConfigError(
                f"data.resolution={data.resolution} / data.channels={data.channels} do not fit the diffusion model "
                f"{path} ({key}), which takes {channels}-channel {size}x{size} images: set data.resolution={size} "
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
