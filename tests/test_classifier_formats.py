"""Classifier weight formats: wrapped / DDP state dicts, torchvision ResNets, OpenOOD's CIFAR ResNet-18."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffguard_pl.models import ClassifierSpec, build_classifier
from diffguard_pl.models.classifier_files import guess_arch
from diffguard_pl.models.openood import CIFAR10_MEAN, CIFAR10_STD

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TINY = ClassifierSpec("diffguard_resnet_tiny", num_classes=6, in_chans=1, input_size=16, mean=[0.5], std=[0.5])
OPENOOD = ClassifierSpec("openood_resnet18_32x32", num_classes=10, in_chans=3, input_size=32,
                         mean=CIFAR10_MEAN, std=CIFAR10_STD)


def _randomise_bn_stats(state):
    """Non-trivial running statistics, so a mix-up of BatchNorm buffers shows in the outputs."""
    gen = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(0.1 * torch.randn(value.shape, generator=gen))
        elif key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=gen))
    return state


# --------------------------------------------------------------------------- containers and prefixes


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "net", "ddp", "lightning_ddp", "safetensors_ddp"])
def test_wrapped_and_ddp_state_dicts_load(tmp_path, wrap):
    torch.manual_seed(0)
    donor = build_classifier(TINY).eval()
    state = donor.model.state_dict()
    ddp = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / ("w.safetensors" if wrap == "safetensors_ddp" else "w.pt")
    if wrap == "safetensors_ddp":
        save_file(ddp, str(path))
    else:
        payload = {
            "plain": state,
            "state_dict": {"state_dict": state, "epoch": 3},
            "model": {"model": state, "optimizer": {"lr": 0.1}},
            "net": {"net": state, "acc": 0.9},
            "ddp": ddp,
            "lightning_ddp": {"state_dict": ddp, "global_step": 7},
        }[wrap]
        torch.save(payload, path)
    torch.manual_seed(1)
    loaded = build_classifier(TINY, path).eval()
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), donor(x))


def test_files_without_a_state_dict_fail_clearly(tmp_path):
    torch.save({"epoch": 3, "acc": 0.5}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match=r"meta\.pt holds no state dict"):
        build_classifier(TINY, tmp_path / "meta.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"Could not read classifier weights .*junk\.pt"):
        build_classifier(TINY, tmp_path / "junk.pt")


# --------------------------------------------------------------------------- torchvision ResNet-50


def test_torchvision_resnet50_state_dict_loads_into_timm_resnet50(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    _randomise_bn_stats(reference.state_dict())
    torch.save(reference.state_dict(), tmp_path / "resnet50-tv.pth")

    spec = ClassifierSpec("resnet50", num_classes=1000, in_chans=3, input_size=64,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
    classifier = build_classifier(spec, tmp_path / "resnet50-tv.pth").eval()
    # same key names and shapes: nothing was renamed or dropped
    own = classifier.model.state_dict()
    assert own.keys() == reference.state_dict().keys()
    assert all(own[k].shape == v.shape for k, v in reference.state_dict().items())
    # v1.5 architecture: stride 2 on the 3x3 conv of a downsampling bottleneck, as in torchvision
    assert classifier.model.layer2[0].conv2.stride == (2, 2) and classifier.model.layer2[0].conv1.stride == (1, 1)

    images = torch.rand(2, 3, 64, 64)
    normalised = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, got = reference(normalised), classifier(images)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- OpenOOD ResNet18_32x32


def _openood_keys(num_classes=10):
    """OpenOOD v1.5 ResNet18_32x32's state dict keys and shapes, written out from its source."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def bn_keys(prefix, c):
        return {f"{prefix}.{b}": (() if b == "num_batches_tracked" else (c,)) for b in bn}

    keys = {"conv1.weight": (64, 3, 3, 3), **bn_keys("bn1", 64)}
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            keys.update(bn_keys(f"{p}.bn1", cout))
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            keys.update(bn_keys(f"{p}.bn2", cout))
            if cin != cout:  # first block of layer2..4: projection shortcut
                keys[f"{p}.shortcut.0.weight"] = (cout, cin, 1, 1)
                keys.update(bn_keys(f"{p}.shortcut.1", cout))
            cin = cout
    keys.update({"fc.weight": (num_classes, 512), "fc.bias": (num_classes,)})
    return keys


def _reference_forward(sd, x):
    """OpenOOD's ResNet18_32x32.forward, computed functionally from the state dict by key name."""

    def bn(h, p):
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            training=False, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=1, padding=1), "bn1"))
    for stage in range(1, 5):
        for block in range(2):
            p, stride = f"layer{stage}.{block}", (2 if stage > 1 and block == 0 else 1)
            out = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in sd:
                skip = bn(F.conv2d(h, sd[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1")
            else:
                skip = h
            h = F.relu(out + skip)
    feature = F.adaptive_avg_pool2d(h, 1).flatten(1)
    return F.linear(feature, sd["fc.weight"], sd["fc.bias"]), feature


def test_openood_cifar10_normalisation_constants():
    # normalization_dict['cifar10'] in OpenOOD's openood/preprocessors/transform.py
    assert CIFAR10_MEAN == [0.4914, 0.4822, 0.4465] and CIFAR10_STD == [0.2470, 0.2435, 0.2616]


def test_openood_resnet18_has_openood_key_layout_and_size():
    model = build_classifier(OPENOOD).model
    state = model.state_dict()
    expected = _openood_keys()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert "layer1.0.shortcut.0.weight" not in state and "layer2.0.shortcut.0.weight" in state
    assert tuple(state["fc.weight"].shape) == (10, 512)
    # ResNet18_32x32 with 10 classes: 11,173,962 parameters
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_openood_checkpoint_loads_and_matches_openood_forward(tmp_path):
    torch.manual_seed(0)
    # An OpenOOD-style best.ckpt: a plain state dict with OpenOOD's key names (here with DDP's prefix too).
    state = _randomise_bn_stats(build_classifier(OPENOOD).model.state_dict())
    assert set(state) == set(_openood_keys())
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "best.ckpt")

    classifier = build_classifier(OPENOOD, tmp_path / "best.ckpt").eval()
    images = torch.rand(2, 3, 32, 32)
    normalised = (images - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_logits, expected_feats = _reference_forward(state, normalised)
        logits, feats = classifier.forward_with_features(images)
        plain = classifier(images)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats, expected_feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, logits, atol=1e-6, rtol=1e-6)


def test_openood_resnet18_timm_interface():
    model = build_classifier(OPENOOD).model
    assert model.num_features == 512 and model.get_classifier() is model.fc
    assert model.feature_info[-1]["module"] == "layer4" and "layer4" in dict(model.named_modules())
    assert model.forward_features(torch.rand(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    model.reset_classifier(100)
    assert model.fc.out_features == 100
    with pytest.raises(ValueError, match="no downloadable weights"):
        import timm

        timm.create_model("openood_resnet18_32x32", pretrained=True)


def test_openood_checkpoint_with_another_class_count_keeps_the_backbone(tmp_path):
    torch.manual_seed(0)
    state = build_classifier(OPENOOD).model.state_dict()
    torch.save(state, tmp_path / "best.ckpt")
    spec100 = ClassifierSpec(**{**OPENOOD.__dict__, "num_classes": 100})
    model = build_classifier(spec100, tmp_path / "best.ckpt").model
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.fc.out_features == 100


# --------------------------------------------------------------------------- wrong files


def test_openood_file_for_a_timm_resnet18_names_the_right_arch(tmp_path):
    torch.save(build_classifier(OPENOOD).model.state_dict(), tmp_path / "best.ckpt")
    spec = ClassifierSpec("resnet18", num_classes=10, in_chans=3, input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    with pytest.raises(ValueError, match="do not fit") as info:
        build_classifier(spec, tmp_path / "best.ckpt")
    message = str(info.value)
    assert str(tmp_path / "best.ckpt") in message and "'resnet18'" in message
    assert "layer2.0.downsample.0.weight" in message and "layer2.0.shortcut.0.weight" in message
    assert "openood_resnet18_32x32" in message


def test_torchvision_file_for_openood_arch_names_resnet50(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(ValueError, match="openood_resnet18_32x32") as info:
        build_classifier(OPENOOD, tmp_path / "resnet50.pth")
    assert "resnet50 (torchvision / timm ResNet layout)" in str(info.value)


def test_training_checkpoint_prefix_is_pointed_out(tmp_path):
    state = build_classifier(TINY).model.state_dict()
    torch.save({"state_dict": {f"classifier.model.{k}": v for k, v in state.items()}}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="prefix 'classifier.model.'"):
        build_classifier(TINY, tmp_path / "last.ckpt")


def test_wrong_input_channels_are_reported_as_shapes(tmp_path):
    torch.save(build_classifier(OPENOOD).model.state_dict(), tmp_path / "best.ckpt")
    spec = ClassifierSpec(**{**OPENOOD.__dict__, "in_chans": 1, "mean": [0.5], "std": [0.5]})
    with pytest.raises(ValueError, match=r"wrong shapes \['conv1.weight \(64, 3, 3, 3\) vs \(64, 1, 3, 3\)'\]"):
        build_classifier(spec, tmp_path / "best.ckpt")


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("resnet18", "resnet18"), ("resnet34", "resnet34"), ("resnet101", "resnet101"), ("resnet10t", "deep stem")],
)
def test_guess_arch_recognises_timm_resnets(arch, expected):
    import timm

    keys = timm.create_model(arch, pretrained=False).state_dict().keys()
    assert expected in guess_arch(keys)


# --------------------------------------------------------------------------- input size from the config


def test_classifier_resizes_larger_images_to_its_input_size():
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    classifier = build_classifier(OPENOOD).eval()
    big = torch.rand(3, 3, 64, 64)
    small = TF.resize(big, [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(classifier(big), classifier(small), atol=1e-5, rtol=1e-5)
    assert classifier.prepare(big).shape == (3, 3, 32, 32)


def test_center_crop_view_gives_the_standard_imagenet_crop_and_places_maps_back():
    from diffguard_pl.method.cam import grad_cam

    torch.manual_seed(0)
    spec = ClassifierSpec("diffguard_resnet_tiny", num_classes=4, in_chans=3, input_size=24, mean=[0.5] * 3,
                          std=[0.5] * 3, view="center_crop")
    classifier = build_classifier(spec).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(classifier(images), classifier(images[..., 4:28, 4:28]))
    cam = grad_cam(classifier, images, torch.tensor([0, 3]))
    assert cam.shape == (2, 1, 32, 32)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[4:28, 4:28] = False
    assert (cam[..., outside] == 0).all() and cam[..., 4:28, 4:28].max() == 1
    with pytest.raises(ValueError, match="centre-crop"):
        classifier(torch.rand(1, 3, 16, 16))
