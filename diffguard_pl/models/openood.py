"""OpenOOD's CIFAR ResNet-18 as a timm model, so OpenOOD checkpoints load as they are.

``openood_resnet18_32x32`` has the architecture of OpenOOD v1.5's
``ResNet18_32x32`` (``openood/networks/resnet18_32x32.py``) and the same
parameter and buffer names, so a checkpoint such as
``cifar10_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt`` (a plain
state dict) loads with every key matched:

* stem ``conv1`` (3x3, stride 1, padding 1, no bias) + ``bn1`` + ReLU, no max-pool;
* ``layer1`` .. ``layer4``: two basic blocks each (64, 128, 256, 512 channels),
  the first block of ``layer2`` .. ``layer4`` has stride 2 on its first 3x3
  conv; a block's ``shortcut`` is ``Sequential(conv 1x1, bn)`` where the
  shape changes and an empty ``Sequential`` (no keys) otherwise;
* global average pooling, then ``fc`` (512 -> classes).

Inputs are normalised with OpenOOD's CIFAR-10 statistics
(:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`; ``normalization_dict`` in
``openood/preprocessors/transform.py``); put them in the classifier config.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


class OpenOODBasicBlock(nn.Module):
    """Post-activation basic block; attribute names follow OpenOOD's ``BasicBlock``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Sequential()  # identity, and no keys in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class OpenOODResNet32(nn.Module):
    """ResNet with a stride-1 3x3 stem for 32x32 inputs (OpenOOD layout). timm model interface."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        depths: tuple = (2, 2, 2, 2),
        drop_rate: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                blocks.append(OpenOODBasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.head_hidden_size = cin
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": w, "reduction": 2**i, "module": f"layer{i + 1}"} for i, w in enumerate(widths)
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x).flatten(1)
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def openood_resnet18_32x32(pretrained: bool = False, **kwargs: Any) -> OpenOODResNet32:
    """OpenOOD v1.5 ``ResNet18_32x32``; load its ``best.ckpt`` with ``classifier.pretrained_path``."""
    if pretrained:
        raise ValueError(
            "openood_resnet18_32x32 has no downloadable weights; pass a local OpenOOD checkpoint "
            "(e.g. cifar10_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt) as classifier.pretrained_path"
        )
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return OpenOODResNet32(**kwargs)
