import json

import pytest
import torch
from safetensors.torch import save_file

from diffguard_pl.config import DiffusionConfig
from diffguard_pl.models import (
    ClassifierSpec,
    DiffusionModel,
    MissingCheckpointError,
    build_classifier,
    build_scheduler,
    build_unet,
    load_classifier,
    load_diffusion,
    save_classifier,
    save_diffusion,
)
from diffguard_pl.models.diffusion import schedule_alphas_cumprod

SPEC = ClassifierSpec("diffguard_resnet_tiny", num_classes=6, in_chans=1, input_size=16, mean=[0.5], std=[0.5])


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    classifier = build_classifier(SPEC).eval()
    save_classifier(classifier, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(classifier(x), loaded(x))
    assert json.loads((tmp_path / "clf" / "classifier.json").read_text())["arch"] == SPEC.arch


def test_classifier_resizes_to_its_own_input_size():
    classifier = build_classifier(ClassifierSpec(**{**SPEC.__dict__, "input_size": 24})).eval()
    big = torch.rand(2, 1, 16, 16)
    assert classifier(big).shape == (2, 6)
    logits, feats = classifier.forward_with_features(big)
    assert torch.allclose(logits, classifier(big), atol=1e-6) and feats.shape == (2, 128)


def test_classifier_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        build_classifier(SPEC)(torch.rand(2, 3, 16, 16))


def test_unknown_timm_arch_names_close_matches():
    with pytest.raises(ValueError, match="resnet18") as info:
        build_classifier(ClassifierSpec(**{**SPEC.__dict__, "arch": "resnet81"}))
    assert "classifier.arch" in str(info.value)


def test_any_timm_arch_with_local_weights_of_another_head(tmp_path):
    import timm

    donor = timm.create_model("resnet10t", num_classes=1000, in_chans=1)
    save_file(donor.state_dict(), str(tmp_path / "w.safetensors"))
    spec = ClassifierSpec("resnet10t", num_classes=6, in_chans=1, input_size=32, mean=[0.5], std=[0.5])
    classifier = build_classifier(spec, tmp_path / "w.safetensors")
    assert torch.equal(classifier.model.conv1[0].weight, donor.conv1[0].weight)
    assert classifier(torch.rand(2, 1, 16, 16)).shape == (2, 6)


def test_pretrained_weights_of_another_arch_are_refused(tmp_path):
    torch.save(build_classifier(SPEC).model.state_dict(), tmp_path / "w.pt")
    spec = ClassifierSpec("resnet10t", num_classes=6, in_chans=1, input_size=32, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="do not fit"):
        build_classifier(spec, tmp_path / "w.pt")


def test_missing_checkpoints_say_how_to_make_them(tmp_path):
    with pytest.raises(MissingCheckpointError, match="train.py --config conf/train_classifier.yaml"):
        load_classifier(tmp_path / "nope")
    with pytest.raises(MissingCheckpointError, match="train_diffusion"):
        load_diffusion(tmp_path / "nope")
    with pytest.raises(MissingCheckpointError, match="w.pt"):
        build_classifier(SPEC, tmp_path / "w.pt")


@pytest.mark.parametrize("conditional", [False, True])
def test_diffusion_round_trip(tmp_path, conditional):
    cfg = DiffusionConfig(conditional=conditional, block_out_channels=[32, 32], attention_levels=[False, True],
                          layers_per_block=1)
    torch.manual_seed(0)
    unet = build_unet(cfg, channels=1, resolution=8, num_classes=6 if conditional else None).eval()
    model = DiffusionModel(unet, schedule_alphas_cumprod(build_scheduler(cfg)), 6 if conditional else None,
                           6 if conditional else None)
    save_diffusion(model, build_scheduler(cfg), tmp_path / "dm")
    loaded = load_diffusion(tmp_path / "dm")
    assert loaded.conditional == conditional and loaded.null_class == model.null_class
    assert torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    y = torch.tensor([0, 5, 6]) if conditional else None
    with torch.no_grad():
        assert torch.equal(model.eps(x, t, y), loaded.eps(x, t, y))
        if conditional:  # no label means the null class
            assert torch.equal(loaded.eps(x, t), loaded.eps(x, t, torch.full((3,), 6)))


class _Constant(torch.nn.Module):
    """A stand-in UNet returning a fixed output (for learned-sigma and NaN handling)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, class_labels=None):
        return type("Out", (), {"sample": self.out})()


def test_learned_sigma_uses_first_channels():
    out = torch.cat([torch.ones(2, 3, 4, 4), 5 * torch.ones(2, 3, 4, 4)], dim=1)
    model = DiffusionModel(_Constant(out), torch.linspace(0.99, 0.01, 10).double())
    assert torch.equal(model.eps(torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])), torch.ones(2, 3, 4, 4))


def test_nan_from_model_fails_clearly():
    model = DiffusionModel(_Constant(torch.full((1, 1, 4, 4), float("nan"))), torch.linspace(0.99, 0.01, 10).double())
    with pytest.raises(FloatingPointError, match="NaN"):
        model.eps(torch.zeros(1, 1, 4, 4), torch.tensor([3]))
