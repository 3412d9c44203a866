"""The contrastive distance: its encoder's loss and augmentations, training by train.py, and the distance itself;
the unguided reference's extra columns (the synthesis against the input, the round trip)."""

import json

import pytest
import torch
import torch.nn.functional as F

from diffguard_pl import config as config_lib
from diffguard_pl.config import ConfigError, CutoutConfig, DiffGuardConfig, EvalConfig, GuidanceConfig, TrainConfig
from diffguard_pl.data.augment import random_photometric, random_resized_crop
from diffguard_pl.models.loading import check_model_files
from diffguard_pl.models import ClassifierSpec, build_classifier, load_classifier
from diffguard_pl.modules.contrastive import contrastive_loss, nearest_neighbour_accuracy
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.method.scores import psnr
from diffguard_pl.jobs.train_job import train

from helpers.models import small_classifier, small_diffusion
from helpers.paths import ROOT


def _loss_by_hand(z, labels, temperature):
    """Khosla et al.'s L_out, anchor by anchor."""
    total, anchors = 0.0, 0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / temperature for a in others]), dim=0)
        total += -sum(z[i] @ z[p] / temperature - denominator for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_contrastive_loss_is_the_supervised_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(10, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 3, 2, 0])  # class 3 has no positive: not an anchor
    assert contrastive_loss(z, labels, 0.1).item() == pytest.approx(_loss_by_hand(z, labels, 0.1).item(), rel=1e-12)
    pairs = torch.arange(5).repeat(2)  # SimCLR: each view's only positive is the other view of its image
    assert contrastive_loss(z, pairs, 0.5).item() == pytest.approx(_loss_by_hand(z, pairs, 0.5).item(), rel=1e-12)
    # embeddings that put each class in its own direction score lower than random ones
    aligned = F.normalize(F.one_hot(labels, 5).double() + 0.01 * torch.randn(10, 5, generator=g, dtype=torch.float64))
    assert contrastive_loss(aligned, labels, 0.1) < contrastive_loss(z, labels, 0.1)


def test_nearest_neighbour_accuracy():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbour_accuracy(features, torch.tensor([0, 0, 1, 1])) == 1.0
    assert nearest_neighbour_accuracy(features, torch.tensor([0, 1, 0, 1])) == 0.0


def test_augmentations_are_seeded_stay_in_range_and_reduce_to_identity():
    images = torch.rand(6, 1, 16, 16)
    assert torch.allclose(random_resized_crop(images, 1.0, flip=False), images, atol=1e-6)
    assert torch.allclose(random_photometric(images, 0.0, 0.0), images, atol=1e-6)
    flipped = random_resized_crop(images, 1.0, flip=True, generator=torch.Generator().manual_seed(1))
    mirrored = [torch.allclose(f, i.flip(-1), atol=1e-6) for f, i in zip(flipped, images)]
    kept = [torch.allclose(f, i, atol=1e-6) for f, i in zip(flipped, images)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    views = [random_photometric(random_resized_crop(images, 0.5, True, torch.Generator().manual_seed(3)), 0.4, 0.5,
                                torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(views[0], views[1]) and not torch.allclose(views[0], images)
    assert views[0].min() >= 0 and views[0].max() <= 1


def _encoder(seed=0):
    torch.manual_seed(seed)
    spec = ClassifierSpec("diffguard_resnet_tiny", num_classes=0, in_chans=1, input_size=16, mean=[0.5], std=[0.5])
    return build_classifier(spec).eval()


def test_the_contrastive_distance_compares_the_encoders_features():
    encoder, classifier, diffusion = _encoder().double(), small_classifier().double(), small_diffusion()
    diffusion.unet.double()
    cfg = DiffGuardConfig(num_steps=6, depth=3, reference="unguided", distances=["l2", "contrastive"],
                          score="contrastive", guidance=GuidanceConfig(scale=30.0, cutout=CutoutConfig(num=0)))
    pipe = DiffGuardPipeline(diffusion, classifier, cfg, encoder=encoder)
    images = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    out = pipe(images, list("abcd"))
    with torch.no_grad():
        want = 1 - F.cosine_similarity(encoder(out["synthesis"]), encoder(out["reference"]), dim=1)
        to_input = 1 - F.cosine_similarity(encoder(out["synthesis"]), encoder(images), dim=1)
    # the scores are stored as float32
    assert torch.allclose(out["scores"]["contrastive"].double(), want, rtol=1e-6) and (want > 0).all()
    assert torch.allclose(out["input_scores"]["contrastive"].double(), to_input, rtol=1e-6)
    assert not torch.allclose(want, to_input)
    assert torch.allclose(out["round_trip_psnr"], psnr(out["reference"], images))
    with torch.no_grad():
        assert out["reference_pred"].tolist() == classifier(out["reference"]).argmax(1).tolist()
    with pytest.raises(ValueError, match="models.encoder"):
        DiffGuardPipeline(small_diffusion(), small_classifier(), cfg)


@pytest.mark.exactness
def test_scores_against_the_input_equal_a_reference_input_run():
    """reference=unguided also scores the same guided synthesis against the input: what reference=input gives
    (float64: the two runs batch the denoiser differently)."""
    diffusion, classifier = small_diffusion(), small_classifier().double()
    diffusion.unet.double()
    base = dict(num_steps=8, depth=4, guidance=GuidanceConfig(scale=3.0, cutout=CutoutConfig(num=2)))
    images, ids = torch.rand(3, 1, 16, 16, dtype=torch.float64), ["a", "b", "c"]
    both = DiffGuardPipeline(diffusion, classifier, DiffGuardConfig(reference="unguided", **base))(images, ids)
    plain = DiffGuardPipeline(diffusion, classifier, DiffGuardConfig(reference="input", **base))(images, ids)
    assert "input_scores" not in plain
    for name, value in plain["scores"].items():
        assert torch.allclose(both["input_scores"][name], value, rtol=1e-9, atol=1e-12), name
        assert not torch.allclose(both["scores"][name], value), name  # the other reference scores otherwise


def test_a_missing_encoder_is_named_before_any_model_work():
    cfg = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / 'digits_gdm.yaml'}",
                                       "diffguard.distances=[l2,contrastive]"], None)
    with pytest.raises(ConfigError, match="models.encoder.*train_fashion_encoder"):
        check_model_files(cfg)  # reads configs only: runs before any weights load


@pytest.mark.training
def test_train_py_trains_an_encoder_that_the_contrastive_distance_loads(tmp_path, benchmark):
    cfg = config_lib.load(TrainConfig, [f"--config={ROOT / 'conf' / 'train_encoder.yaml'}", f"output_dir={tmp_path}",
                                        "trainer.max_epochs=1", "trainer.limit_train_batches=3", "data.batch_size=32",
                                        "trainer.enable_progress_bar=false", "optim.warmup_steps=1"], None)
    metrics = train(cfg, benchmark)
    assert 0 < metrics["val/nn_acc"] <= 1 and metrics["val/loss"] > 0 and metrics["global_step"] == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["test/nn_acc"] > 0
    encoder = load_classifier(tmp_path / "encoder")
    assert encoder.spec.num_classes == 0
    with torch.no_grad():
        logits, feats = encoder.forward_with_features(benchmark.test.images[:4])
    assert feats.shape == (4, 128) and torch.equal(logits, feats)  # no head: the "logits" are the features
