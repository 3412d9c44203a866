import os
import random
import shutil

# Small tensors: one thread per process is faster than two and keeps subprocess tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffguard_pl.config import DataConfig  # noqa: E402
from diffguard_pl.data import build_benchmark  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def same_random_state():
    """Every test starts from the same random state, whatever ran before it on its pytest-xdist worker."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def benchmark():
    """The default embedded benchmark, built once per test session."""
    return build_benchmark(DataConfig())


@pytest.fixture(scope="session")
def small_models(tmp_path_factory):
    """A random small classifier and unconditional UNet saved in their portable formats."""
    from diffguard_pl.config import DiffusionConfig
    from diffguard_pl.models import (
        ClassifierSpec, DiffusionModel, build_classifier, build_scheduler, build_unet, save_classifier, save_diffusion,
    )

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    spec = ClassifierSpec("diffguard_resnet_tiny", num_classes=6, in_chans=1, input_size=16, mean=[0.5], std=[0.5])
    save_classifier(build_classifier(spec).eval(), folder / "classifier")
    cfg = DiffusionConfig(block_out_channels=[32, 32], attention_levels=[False, True], layers_per_block=1)
    unet = build_unet(cfg, 1, 16, None)
    save_diffusion(DiffusionModel(unet, build_scheduler(cfg).alphas_cumprod.double()), build_scheduler(cfg),
                   folder / "diffusion")
    return folder


def built_once(tmp_path_factory, name, build):
    """A folder that ``build(folder)`` fills once per test session, shared by pytest-xdist's workers (the first
    one builds it under a file lock, the others wait and read it)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each worker's own
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def latent_stack(tmp_path_factory, benchmark):
    """Tiny latent diffusion models saved with save_pretrained (loaded back through from_pretrained in tests).

    ``unet_kl``: a class-conditional UNet2DModel on 8 x 8 x 2 latents of an AutoencoderKL briefly trained on
    InD train images (150 steps); ``dit_vq``: a learned-sigma DiT on the latents of a random VQModel.
    """
    return built_once(tmp_path_factory, "latent", lambda folder: build_latent_stack(folder, benchmark))


def build_latent_stack(folder, benchmark):
    from diffguard_pl.config import DiffusionConfig
    from diffguard_pl.models import DiffusionModel, build_scheduler, build_unet, save_diffusion
    from diffguard_pl.models.builders import fit_autoencoder, tiny_autoencoder, tiny_dit

    cfg = DiffusionConfig(conditional=True, block_out_channels=[32, 32], attention_levels=[False, True],
                          layers_per_block=1)
    scheduler = build_scheduler(cfg)
    torch.manual_seed(0)
    vae = fit_autoencoder(tiny_autoencoder(kind="kl"), benchmark.train.images, steps=150)
    unet = build_unet(cfg, 2, 8, 6)
    save_diffusion(DiffusionModel(unet, scheduler.alphas_cumprod.double(), 6, 6, vae), scheduler, folder / "unet_kl")
    torch.manual_seed(1)
    dit, vq = tiny_dit(num_classes=6), tiny_autoencoder(kind="vq")
    save_diffusion(DiffusionModel(dit, scheduler.alphas_cumprod.double(), 6, 6, vq), scheduler, folder / "dit_vq")
