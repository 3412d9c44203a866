"""A contrastive image encoder trained on InD training images only (``task=contrastive``): the semantic
distance ``diffguard.distances: [contrastive]`` compares its features of the synthesis and the reference.

The paper's stated future work ("a contrastive-learning distance to see fine semantic differences"), built so
that it is independent of the classifier that guides the synthesis. Two augmented views of every image go
through a timm backbone (``classifier.arch``, no classification head) and a two-layer projection head;
the loss is the supervised contrastive loss of Khosla et al. (2020) on the InD labels (``contrastive.supervised``)
or SimCLR's NT-Xent (only the other view of the same image is a positive). The exported encoder is the
backbone alone (a portable classifier folder whose ``num_classes`` is 0: its "logits" are its features);
the projection head is dropped, as usual.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffguard_pl.config import ContrastiveConfig, OptimConfig
from diffguard_pl.data.augment import random_photometric, random_resized_crop
from diffguard_pl.seeding import sample_seed
from diffguard_pl.models.classifier import ClassifierSpec, build_classifier, save_classifier
from diffguard_pl.modules.optim import configure

VAL_SALT = "contrastive-val"


def contrastive_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) of L2-normalised embeddings ``z`` [M, D].

    Rows with equal ``labels`` are positives of each other (give every image's two views one label of their
    own for SimCLR's NT-Xent). For each anchor i: -mean over positives p of log(exp(z_i.z_p / T) /
    sum_{a != i} exp(z_i.z_a / T)); averaged over the anchors that have a positive.
    """
    similarity = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    count = positives.sum(dim=1)
    has = count > 0
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(summed[has] / count[has]).mean()


def nearest_neighbour_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy (cosine) of ``features`` [N, D]: how well the embedding separates classes."""
    z = F.normalize(features.double(), dim=1)
    similarity = (z @ z.T).fill_diagonal_(-2.0)
    return float((labels[similarity.argmax(dim=1)] == labels).double().mean())


class ContrastiveModule(L.LightningModule):
    def __init__(self, spec: ClassifierSpec, optim: OptimConfig, cfg: ContrastiveConfig):
        super().__init__()
        self.save_hyperparameters({"spec": asdict(spec), "optim": asdict(optim), "contrastive": asdict(cfg)})
        self.encoder = build_classifier(spec)  # num_classes 0: the backbone's pooled features
        width = int(self.encoder.model.num_features)
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, cfg.projection_dim))
        self.cfg, self.optim_cfg = cfg, optim
        self._features: list = []  # of the validation (or test) epoch, for the 1-NN accuracy
        self._labels: list = []

    def views(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Two augmented views of every image, [2N, C, H, W] (first views, then second views)."""
        c = self.cfg
        pair = torch.cat([images, images])
        pair = random_resized_crop(pair, c.crop_min_scale, c.flip, generator)
        return random_photometric(pair, c.jitter, c.blur_probability, generator)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
        z = F.normalize(self.projection(self.encoder(self.views(images, generator))), dim=1)
        n = images.shape[0]
        identity = labels if self.cfg.supervised else torch.arange(n, device=images.device)
        return contrastive_loss(z, torch.cat([identity, identity]), self.cfg.temperature)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch["image"], batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch: dict, prefix: str) -> None:
        keep = batch["label"] >= 0  # OOD samples (label -1) carry no class
        images, labels = batch["image"][keep], batch["label"][keep]
        if not len(images):
            return
        ids = [i for i, k in zip(batch["id"], keep.tolist()) if k]
        # the same views at every validation: augmentations seeded by the batch's first sample id
        generator = torch.Generator().manual_seed(sample_seed(f"{VAL_SALT}:{ids[0]}"))
        self.log(f"{prefix}/loss", self.loss(images, labels, generator), prog_bar=True, batch_size=len(images),
                 sync_dist=True)
        self._features.append(self.encoder(images).detach().cpu())
        self._labels.append(labels.cpu())

    def _eval_epoch_end(self, prefix: str) -> None:
        if self._features:
            accuracy = nearest_neighbour_accuracy(torch.cat(self._features), torch.cat(self._labels))
            self.log(f"{prefix}/nn_acc", accuracy, prog_bar=True)
        self._features, self._labels = [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def export(self, directory) -> None:
        save_classifier(self.encoder, directory)

    def configure_optimizers(self) -> dict:
        return configure(self, self.parameters(), self.optim_cfg)
