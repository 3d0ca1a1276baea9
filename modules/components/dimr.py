"""DiMR: a multi-resolution diffusion denoiser with time-dependent LayerNorm (Liu et al. 2024, "Alleviating
Distortion in Image Generation via Multi-Resolution Diffusion Models").

A transformer refines coarse tokens at the lowest resolution; lighter ConvNeXt-style blocks refine the
upsampled features at each finer resolution, each also seeing the noisy input at its own resolution. The
timestep enters only through TD-LN; the class enters as one extra token of the transformer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, PatchEmbed, build_sincos2d_pos_embed
from torch import nn

from modules.components.errors import ConfigError


class TDLayerNorm(nn.LayerNorm):
    """TD-LN: LayerNorm whose scale and shift interpolate between two learned vectors by the timestep.

    ``gamma(t) = a(t) gamma_1 + (1 - a(t)) gamma_2`` (same for beta) with ``a(t) = sigmoid(w t/T + b)``: two
    D-vectors per affine and two scalars, instead of an adaLN regressor of 2 D^2 weights.

    Args:
        dim: normalised (last) dimension.
        timesteps: T, the number of diffusion steps (t is normalised by it).
        init_std: spread of the two endpoint vectors around (1, 0), so t matters from the start.
    """

    def __init__(self, dim: int, timesteps: int = 1000, init_std: float = 0.02):
        super().__init__(dim, eps=1e-6, elementwise_affine=False)
        self.timesteps = timesteps
        self.scales = nn.Parameter(1 + init_std * torch.randn(2, dim))  # gamma_1, gamma_2
        self.shifts = nn.Parameter(init_std * torch.randn(2, dim))  # beta_1, beta_2
        self.time_weight = nn.Parameter(torch.tensor(6.0))
        self.time_offset = nn.Parameter(torch.tensor(-3.0))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, ..., D), t (B,) integer timesteps."""
        mix = torch.sigmoid(self.time_weight * t.float() / self.timesteps + self.time_offset)  # (B,)
        mix = mix.view(-1, *([1] * (x.ndim - 1)))
        scale = mix * self.scales[0] + (1 - mix) * self.scales[1]
        shift = mix * self.shifts[0] + (1 - mix) * self.shifts[1]
        return super().forward(x) * scale + shift


class TDTransformerBlock(nn.Module):
    """Pre-norm transformer block with TD-LN norms, (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, timesteps: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = TDLayerNorm(dim, timesteps)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = TDLayerNorm(dim, timesteps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, t))
        return x + self.mlp(self.norm2(x, t))


class TDConvBlock(nn.Module):
    """ConvNeXt-style block (7x7 depthwise conv, TD-LN, pointwise MLP), (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, timesteps: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = TDLayerNorm(dim, timesteps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        return x + self.mlp(self.norm(y, t)).permute(0, 3, 1, 2)


class ResolutionStage(nn.Module):
    """Upsample 2x from the coarser stage, add the noisy input patchified at this resolution, refine with conv blocks."""

    def __init__(self, in_dim: int, dim: int, in_channels: int, stride: int, depth: int, timesteps: int):
        super().__init__()
        self.up = nn.Conv2d(in_dim, 4 * dim, 1)  # then pixel shuffle: (B, 4C, h, w) -> (B, C, 2h, 2w)
        self.stem = nn.Conv2d(in_channels, dim, stride, stride=stride)
        self.blocks = nn.ModuleList(TDConvBlock(dim, timesteps) for _ in range(depth))

    def forward(self, features: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.pixel_shuffle(self.up(features), 2) + self.stem(x)
        for block in self.blocks:
            h = block(h, t)
        return h


class DiMR(nn.Module):
    """Class-conditional multi-resolution denoiser predicting eps from (x_t, t, label).

    Args:
        input_size: side of the (square) input.
        in_channels: input (and output) channels.
        num_classes: classes; label ``num_classes`` is the null class for classifier-free guidance.
        patch_size: patch side of the lowest-resolution transformer (a power of 2: one conv stage per 2x).
        dim: transformer width; conv stages halve it at each finer resolution (at least 16).
        depth: transformer blocks.
        heads: attention heads.
        conv_depth: conv blocks per finer-resolution stage.
        timesteps: diffusion steps T (TD-LN normalises t by it).
    """

    def __init__(self, input_size: int = 32, in_channels: int = 3, num_classes: int = 10, patch_size: int = 4,
                 dim: int = 128, depth: int = 4, heads: int = 4, conv_depth: int = 1, timesteps: int = 1000):
        super().__init__()
        stages = int(math.log2(patch_size))
        if 2**stages != patch_size or input_size % patch_size:
            raise ConfigError(f"DiMR patch_size {patch_size} must be a power of 2 dividing input_size {input_size}")
        self.in_channels = in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, dim)
        self.grid = self.x_embedder.grid_size
        self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(self.grid), dim).unsqueeze(0), persistent=False)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        self.blocks = nn.ModuleList(TDTransformerBlock(dim, heads, timesteps) for _ in range(depth))
        self.norm = TDLayerNorm(dim, timesteps)
        dims = [dim] + [max(16, dim // 2 ** (i + 1)) for i in range(stages)]
        self.stages = nn.ModuleList(
            ResolutionStage(dims[i], dims[i + 1], in_channels, patch_size // 2 ** (i + 1), conv_depth, timesteps)
            for i in range(stages)
        )
        self.out_norm = TDLayerNorm(dims[-1], timesteps)
        self.head = nn.Conv2d(dims[-1], in_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        tokens = torch.cat([self.y_embedder(labels).unsqueeze(1), tokens], dim=1)  # (B, 1 + N, D)
        for block in self.blocks:
            tokens = block(tokens, t)
        tokens = self.norm(tokens[:, 1:], t)
        features = tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)  # (B, D, h, w)
        for stage in self.stages:
            features = stage(features, x, t)  # (B, C_i, 2h, 2w)
        features = self.out_norm(features.permute(0, 2, 3, 1), t).permute(0, 3, 1, 2)
        return self.head(features)  # (B, C, H, W)
