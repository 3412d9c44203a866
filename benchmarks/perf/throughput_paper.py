"""``--paper-scale``: the paths of benchmarks.perf.throughput on the paper's architectures, with random weights.

No checkpoints are needed: the ADM-256 unconditional UNet (guided-diffusion's 256x256_diffusion_uncond flags through
``diffguard_pl.models.convert``'s config mapping) with timm's ResNet-50 at 224 px for the GDM paths, settings of
``conf/imagenet_gdm.yaml`` (100 spaced steps, depth 90, 8 cutouts, scale 3, unguided reference; ``gdm`` without AES,
``gdm_aes`` with the released thresholds); DiT-XL/2-256 with the Stable Diffusion autoencoder and ResNet-50
(Grad-CAM on layer4) for ``classifier_free_dsg``, settings of ``conf/imagenet_ldm.yaml`` (25 steps, omega 10).
DISTS is replaced by ``l2`` (score and AES) when its weights are not in the torch hub cache (printed). Random
weights make AES stop at meaningless depths: the ``gdm`` path (fixed depth 90) is the released-settings
measurement. ``--tiny-arch`` shrinks these architectures (same code paths) to test the script on a CPU.

The images are smooth random RGB images: at a fixed depth their content does not change the cost.
"""

from __future__ import annotations

from typing import List

import torch

from diffguard_pl.config import EvalConfig

PAPER_PATHS = {  # name: (preset, overrides)
    "gdm": ("imagenet_gdm", ["diffguard.aes.enabled=false"]),
    "gdm_aes": ("imagenet_gdm", []),
    "classifier_free_dsg": ("imagenet_ldm", []),
}
ADM256_FLAGS = dict(  # guided-diffusion's 256x256_diffusion_uncond.pt
    attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, image_size=256, learn_sigma=True,
    noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
    use_fp16=False, use_scale_shift_norm=True,
)
TINY_ADM_FLAGS = dict(ADM256_FLAGS, image_size=32, num_channels=32, num_head_channels=16, num_res_blocks=1,
                      attention_resolutions="8,4")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def paper_overrides(preset: str, notes: List[str]) -> List[str]:
    """DISTS -> l2 when its weights are absent (score, distances, AES)."""
    from diffguard_pl.method.scores import check_perceptual_files

    if "imagenet_gdm" not in preset:
        return []
    try:
        check_perceptual_files(["dists"])
        return []
    except FileNotFoundError:
        note = "DISTS weights not in the torch hub cache: score dists -> l2, AES uses PSNR only"
        if note not in notes:
            notes.append(note)
        return ["diffguard.score=l2", "diffguard.distances=[l2,ssim,logit_l1,feature_cos]", "diffguard.aes.dists=null"]


def paper_images(count: int, size: int):
    """Smooth random RGB images in [0, 1] (content does not change the cost at fixed depth)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, max(2, size // 16), max(2, size // 16), generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1), [f"random/{i:05d}" for i in range(count)]


class PaperSuite:
    """The paper-scale paths: their presets, overrides, models (random weights, seed 0) and images.

    The models are large: only the classifier (shared by every path) and the current path's diffusion model are
    kept on the device."""

    paths = PAPER_PATHS

    def __init__(self, device: torch.device, tiny: bool):
        self.device, self.tiny = device, tiny
        self._cache: dict = {}

    def overrides(self, preset: str, notes: List[str]) -> List[str]:
        """:func:`paper_overrides` (DISTS -> l2 when its weights are absent, with a note)."""
        return paper_overrides(preset, notes)

    def images(self, cfg: EvalConfig, pipe, count: int):
        """:func:`paper_images` at the diffusion model's image size."""
        return paper_images(count, pipe.diffusion.image_size)

    def models(self, path: str, cfg: EvalConfig):
        """(diffusion model, classifier) of ``path``, built on first use."""
        classifier = self._keep("classifier", self._resnet50)
        latent = path == "classifier_free_dsg"
        diffusion = self._keep("dit" if latent else "adm", self._dit if latent else self._adm)
        return diffusion, classifier

    def _keep(self, key: str, build):
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k == "classifier"}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            self._cache[key] = build().to(self.device)  # random weights, built on the CPU
        return self._cache[key]

    def _resnet50(self):
        from diffguard_pl.models import ClassifierSpec, build_classifier

        size = 32 if self.tiny else 224
        return build_classifier(ClassifierSpec("resnet50", 1000, 3, size, IMAGENET_MEAN, IMAGENET_STD)).eval()

    def _adm(self):
        from diffusers import UNet2DModel

        from diffguard_pl.models.convert import adm_config_from_flags, adm_scheduler, diffusers_unet_config
        from diffguard_pl.models import DiffusionModel

        flags = TINY_ADM_FLAGS if self.tiny else ADM256_FLAGS
        unet = UNet2DModel(**diffusers_unet_config(adm_config_from_flags(flags))).eval()
        scheduler = adm_scheduler(1000, "linear", learn_sigma=True)
        return DiffusionModel(unet, scheduler.alphas_cumprod.double().cpu())

    def _dit(self):
        from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

        from diffguard_pl.models import DiffusionModel
        from diffguard_pl.models.builders import dit_xl2, sd_autoencoder

        if self.tiny:
            dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                                layers_per_block=1, latent_channels=4, sample_size=32, scaling_factor=0.18215)
        else:
            dit, vae = dit_xl2(), sd_autoencoder()
        alphas = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
        return DiffusionModel(dit.eval(), alphas.cpu(), 1000, 1000, vae.eval())
