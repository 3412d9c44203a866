"""Small random models (a tiny classifier, a small UNet) and a hand-made eps model that records its calls."""

import torch

from diffguard_pl.config import DiffusionConfig
from diffguard_pl.models import ClassifierSpec, DiffusionModel, build_classifier, build_scheduler, build_unet
from diffguard_pl.models.diffusion import schedule_alphas_cumprod

SPEC = ClassifierSpec("diffguard_resnet_tiny", num_classes=6, in_chans=1, input_size=16, mean=[0.5], std=[0.5])
ALPHAS = schedule_alphas_cumprod(build_scheduler(DiffusionConfig()))


def small_diffusion(conditional=False, seed=0):
    """A random small UNet on 16 x 16 gray images (class-conditional: 6 classes and the null class 6)."""
    torch.manual_seed(seed)
    cfg = DiffusionConfig(conditional=conditional, block_out_channels=[32, 32], attention_levels=[False, True],
                          layers_per_block=1)
    unet = build_unet(cfg, 1, 16, 6 if conditional else None).eval()
    return DiffusionModel(unet, ALPHAS, 6 if conditional else None, 6 if conditional else None)


def small_classifier(seed=0):
    """A random ``diffguard_resnet_tiny`` for 6 classes of 16 x 16 gray images, in eval mode."""
    torch.manual_seed(seed)
    return build_classifier(SPEC).eval()


class RecordingUNet(torch.nn.Module):
    """Hand-made eps model: a fixed eps per sample position, recording every call."""

    def __init__(self, eps):
        super().__init__()
        self.register_buffer("fixed", eps)
        self.calls = []
        self.config = type("Config", (), {"in_channels": eps.shape[1], "sample_size": eps.shape[-1]})()

    def forward(self, x, t, class_labels=None):
        self.calls.append((t.clone(), x.clone()))
        return type("Out", (), {"sample": self.fixed[: x.shape[0]].to(x.dtype)})()
