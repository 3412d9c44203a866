import os

# Small tensors: one thread per process is faster than two and keeps subprocess tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffguard_pl.config import DataConfig  # noqa: E402
from diffguard_pl.data import build_benchmark  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture(scope="session")
def latent_stack(tmp_path_factory, benchmark):
    """Tiny latent diffusion models saved with save_pretrained (loaded back through from_pretrained in tests).

    ``unet_kl``: a class-conditional UNet2DModel on 8 x 8 x 2 latents of an AutoencoderKL briefly trained on
    InD train images (150 steps); ``dit_vq``: a learned-sigma DiT on the latents of a random VQModel.
    """
    from diffguard_pl.config import DiffusionConfig
    from diffguard_pl.models import DiffusionModel, build_scheduler, build_unet, save_diffusion
    from diffguard_pl.models.builders import fit_autoencoder, tiny_autoencoder, tiny_dit

    folder = tmp_path_factory.mktemp("latent")
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
    return folder
