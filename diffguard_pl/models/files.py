"""Where a model's files are and what their configs say, read without torch: the checks that need only a
model's shapes (image size, channels, classes) run before any weights load.

A diffusion model is a diffusers folder (``unet/`` or ``transformer/``, optionally ``vae/`` or ``vqvae/``,
``scheduler/``; or a bare denoiser folder), or a Hugging Face Hub id found in the local cache (nothing is
downloaded). A classifier is a portable folder (``classifier.json`` + ``model.safetensors``) or a weights file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffguard_pl.errors import MissingCheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CLASSIFIER_META = "classifier.json"
TRAIN_DIFFUSION = ("Train one with `python train.py --config conf/train_diffusion_uncond.yaml output_dir=OUT` and use "
                   "OUT/diffusion, or convert a guided-diffusion checkpoint with `python -m diffguard_pl.models.convert`.")


def resolve_model_path(path: str | Path) -> Path:
    """A local folder as it is; a Hub id (``org/name``) from the local Hugging Face cache, never downloaded."""
    if Path(path).exists() or not HUB_ID.match(str(path)):
        return Path(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError and friends: not in the cache
        raise MissingCheckpointError(
            f"{path} is neither a local folder nor a model in the Hugging Face cache {HF_HUB_CACHE} "
            f"({type(error).__name__}). Nothing is downloaded at run time: on a machine with internet run "
            f"`huggingface-cli download {path}` (and copy the cache folder here, or set HF_HOME), or pass the "
            f"path of a diffusers folder."
        ) from None


@dataclass
class DiffusionFolders:
    root: Path
    denoiser: Path
    autoencoder: Optional[Path]
    scheduler: Optional[Path]  # None: diffusers' default linear schedule


def diffusion_folders(path: str | Path) -> DiffusionFolders:
    """The component folders of a diffusers model; MissingCheckpointError naming the path and the fix."""
    root = resolve_model_path(path)
    denoiser = next((root / sub for sub in ("unet", "transformer") if (root / sub / "config.json").is_file()),
                    root if (root / "config.json").is_file() else None)
    if denoiser is None:
        raise MissingCheckpointError(f"No diffusers model at {root} (expected unet/config.json, "
                                     f"transformer/config.json or config.json). {TRAIN_DIFFUSION}")
    autoencoder = next((root / sub for sub in ("vae", "vqvae") if (root / sub / "config.json").is_file()), None)
    scheduler_dir = root / "scheduler" if denoiser != root else root
    scheduler = scheduler_dir if (scheduler_dir / "scheduler_config.json").is_file() else None
    return DiffusionFolders(root, denoiser, autoencoder, scheduler)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def diffusion_image_shape(path: str | Path) -> tuple[int, int]:
    """(image channels, image side) the diffusion model at ``path`` works on, from its configs alone."""
    folders = diffusion_folders(path)
    denoiser = _config(folders.denoiser)
    size = denoiser["sample_size"]
    side = int(size if isinstance(size, int) else size[0])
    if folders.autoencoder is None:
        return int(denoiser["in_channels"]), side
    autoencoder = _config(folders.autoencoder)
    return int(autoencoder["in_channels"]), side * 2 ** (len(autoencoder["block_out_channels"]) - 1)


def classifier_meta(path: str | Path) -> Optional[dict]:
    """A portable classifier folder's ``classifier.json`` (None for a weights file); MissingCheckpointError
    naming the folder and the command that makes one when neither exists."""
    path = Path(path)
    if path.is_file():
        return None
    if not (path / CLASSIFIER_META).is_file() or not (path / "model.safetensors").is_file():
        raise MissingCheckpointError(
            f"No classifier checkpoint at {path} (expected {CLASSIFIER_META} and model.safetensors). "
            f"Train one with `python train.py --config conf/train_classifier.yaml output_dir=OUT` "
            f"and use OUT/classifier."
        )
    return json.loads((path / CLASSIFIER_META).read_text())
