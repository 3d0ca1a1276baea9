"""A hierarchical side network for side-tuning a frozen backbone (pure torch + timm, no Lightning)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.errors import ConfigError


# --------------------------------------------------------------------------------------------------
@dataclass
class SideConfig:
    """Side network settings.

    Args:
        dim: channels of the side stream.
        taps: backbone intermediates it reads (timm ``forward_intermediates`` indices; an int n = the last n).
    """

    dim: int = 32
    taps: int | list[int] = field(default=4)


class SideBlock(nn.Module):
    """Light ConvNeXt-style block of the side stream: depthwise 3x3, norm, pointwise MLP, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.GroupNorm(1, dim)
        self.fc1 = nn.Conv2d(dim, 2 * dim, 1)
        self.fc2 = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(self.dwconv(x)))))


class SideNetwork(nn.Module):
    """Side stream fed, level by level, by the frozen backbone's intermediate maps; ends in the task head.

    A simplification of Hierarchical Side-Tuning (HST, Lin et al. 2023): HST also prepends learnable *meta
    tokens* to every layer of the frozen ViT (their outputs, with the patch tokens, feed the side network)
    and gives the side network its own convolutional stem on the image; both are absent here. The side
    stream starts from the first tapped map and reads only the frozen backbone's activations, so the
    backbone's forward is untouched (it runs under ``no_grad``) and any timm model with
    ``forward_intermediates`` works, CNNs included.

    Each tap is projected to ``dim`` channels (1x1 conv) and added to the side stream, which is pooled to
    the tap's resolution first (coarse-to-fine backbones make it multi-scale; isotropic ViTs keep the token
    grid), then refined by a :class:`SideBlock`. Global pooling + LayerNorm + linear head give the logits.

    Args:
        in_channels: channels of each tap, in the order they arrive.
        dim: side-stream channels.
        num_classes: classifier outputs.
    """

    def __init__(self, in_channels: list[int], dim: int, num_classes: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.blocks = nn.ModuleList(SideBlock(dim) for _ in in_channels)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        side = None
        for feature, lateral, block in zip(features, self.laterals, self.blocks):
            x = lateral(feature)  # (B, dim, H_i, W_i)
            if side is not None:
                x = x + (side if side.shape[-2:] == x.shape[-2:] else F.adaptive_avg_pool2d(side, x.shape[-2:]))
            side = block(x)
        return self.norm(side.mean(dim=(2, 3)))  # (B, dim)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.forward_features(features))


def backbone_intermediates(backbone: nn.Module, images: torch.Tensor, taps: int | list[int]) -> list[torch.Tensor]:
    """NCHW intermediate maps of a timm model (``forward_intermediates``; ViT prefix tokens dropped)."""
    if not hasattr(backbone, "forward_intermediates"):
        raise ConfigError(f"{type(backbone).__name__} has no forward_intermediates: side-tuning needs a timm model that has it")
    return backbone.forward_intermediates(images, indices=taps, intermediates_only=True)
