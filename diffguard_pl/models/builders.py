"""Fresh latent-diffusion components for tests, demos and throughput benchmarks.

``tiny_*`` build small models for the embedded benchmark's 16 px images (a
latent stack that runs in seconds on a CPU); ``dit_xl2`` and
``sd_autoencoder`` build the paper-scale architectures (DiT-XL/2-256 and the
Stable Diffusion autoencoder DiT uses) with random weights, for measuring
speed without the real checkpoints. :func:`fit_autoencoder` briefly trains an
autoencoder on images so that its round trip means something.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiTTransformer2DModel, VQModel


def tiny_autoencoder(channels: int = 1, latent_channels: int = 2, kind: str = "kl", size: int = 16):
    """A two-level autoencoder (downsampling 2): AutoencoderKL (``kind="kl"``) or VQModel (``"vq"``)."""
    common = dict(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=size,
        scaling_factor=1.0,
    )
    if kind == "kl":
        return AutoencoderKL(**common)
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=256, vq_embed_dim=latent_channels)
    raise ValueError(f"autoencoder kind {kind!r} is not one of kl, vq")


def tiny_dit(latent_channels: int = 2, latent_size: int = 8, num_classes: int = 6) -> DiTTransformer2DModel:
    """A two-layer DiT with learned sigma (out = 2 x in channels) and a null class row (id ``num_classes``)."""
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=latent_channels,
        out_channels=2 * latent_channels,
        num_layers=2,
        sample_size=latent_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )


def dit_xl2(latent_size: int = 32, num_classes: int = 1000) -> DiTTransformer2DModel:
    """DiT-XL/2 (28 layers, 16 heads of 72, patch 2, learned sigma), as facebook/DiT-XL-2-256 for 32 x 32 latents."""
    return DiTTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        sample_size=latent_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )


def sd_autoencoder(size: int = 256) -> AutoencoderKL:
    """The Stable Diffusion KL-f8 autoencoder (sd-vae-ft-ema architecture, 4 latent channels, scale 0.18215)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=size,
        scaling_factor=0.18215,
    )


def fit_autoencoder(vae, images01: torch.Tensor, steps: int = 200, lr: float = 2e-3, batch: int = 64,
                    seed: int = 0, kl_weight: float = 1e-6):
    """Train ``vae`` to reconstruct ``images01`` ([N, C, H, W] in [0, 1]) for a few steps; set its scaling factor.

    Plain L1 reconstruction (+ a tiny KL term for AutoencoderKL, the VQ
    commitment loss for VQModel). The scaling factor becomes 1 / std of the
    scaled-down latents, as for Stable Diffusion, so latents have unit variance.
    """
    g = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(vae.parameters(), lr=lr)
    x_all = images01 * 2 - 1
    vae.train()
    for _ in range(steps):
        x = x_all[torch.randint(len(x_all), (batch,), generator=g)]
        if isinstance(vae, VQModel):
            h = vae.encode(x).latents
            decoded, commit = vae.decode(h, return_dict=False)
            loss = F.l1_loss(decoded, x) + commit.mean()
        else:
            posterior = vae.encode(x).latent_dist
            decoded = vae.decode(posterior.sample(generator=None)).sample
            loss = F.l1_loss(decoded, x) + kl_weight * posterior.kl().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    vae.eval()
    with torch.no_grad():
        encoded = vae.encode(x_all[:256])
        z = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae
