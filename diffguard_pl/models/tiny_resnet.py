"""``diffguard_resnet_tiny``: a small pre-activation ResNet for low-resolution inputs (the embedded benchmark's
default classifier), created through timm like any other architecture once
:func:`diffguard_pl.models.register_timm_models` has added :func:`diffguard_resnet_tiny` to timm's registry
(``diffguard_pl.models`` does so when it is imported).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        return skip + self.conv2(F.relu(self.bn2(h)))


class TinyResNet(nn.Module):
    """Pre-activation ResNet with stride-1 stem, for 8-32 px inputs. timm model interface."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple = (32, 64, 128),
        depths: tuple = (1, 1, 1),
        drop_rate: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [_PreActBlock(cin if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(cin)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": w, "reduction": 2**i, "module": f"stages.{i}"} for i, w in enumerate(widths)
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.stages(self.stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def diffguard_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> TinyResNet:
    """timm's entry point for :class:`TinyResNet` (``timm.create_model("diffguard_resnet_tiny", ...)``)."""
    if pretrained:
        raise ValueError("diffguard_resnet_tiny has no downloadable weights; pass a local checkpoint instead")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return TinyResNet(**kwargs)


__all__ = [
    "TinyResNet",
    "diffguard_resnet_tiny",
]
