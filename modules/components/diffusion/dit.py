"""DiT: a class-conditional diffusion transformer with adaLN-zero (Peebles & Xie 2023, facebookresearch/DiT).

With ``learn_sigma`` (the reference's default) the final layer predicts 2C channels: the noise and improved DDPM's
variance interpolation values. Blocks carry optional residual-branch scale factors (``gamma_attn``, ``gamma_mlp``,
None by default) that :class:`modules.components.diffusion.difffit.DiffFit` adds for fine-tuning.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Attention, Mlp, PatchEmbed, build_sincos2d_pos_embed
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies -> 2-layer MLP, (B,) -> (B, dim)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = Mlp(frequency_dim, dim, dim, act_layer=nn.SiLU)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale, gate) by the conditioning vector.

    The modulation regressor is zero-initialised (adaLN-zero), so each block starts as the identity.
    ``gamma_attn`` / ``gamma_mlp``: optional (D,) scale factors of the attention and MLP branches (DiffFit sets them).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)
        self.gamma_attn: nn.Parameter | None = None
        self.gamma_mlp: nn.Parameter | None = None

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).chunk(6, dim=-1)  # 6 x (B, D)
        attn = gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        mlp_input = x + (attn if self.gamma_attn is None else self.gamma_attn * attn)
        mlp = gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(mlp_input), shift2, scale2))
        return mlp_input + (mlp if self.gamma_mlp is None else self.gamma_mlp * mlp)


class FinalLayer(nn.Module):
    """adaLN-modulated norm + zero-initialised linear to patch pixels, (B, N, D) -> (B, N, p*p*C)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for layer in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p) for a square grid."""
    batch, count, _ = tokens.shape
    side = int(math.isqrt(count))
    x = tokens.reshape(batch, side, side, patch_size, patch_size, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(batch, channels, side * patch_size, side * patch_size)


class DiT(nn.Module):
    """Class-conditional DiT predicting the noise eps (and, with ``learn_sigma``, the variance) from (x_t, t, label).

    Initialised as the reference: Xavier-uniform Linear layers (and the patch projection, viewed as a Linear) with
    zero biases, normal(0.02) timestep-MLP and class-embedding weights, zero adaLN regressors and output layer.

    Args:
        input_size: side of the (square) input in pixels or latent cells.
        in_channels: input channels C.
        num_classes: classes; label ``num_classes`` is the null class used for classifier-free guidance.
        patch_size: patch side.
        dim: token width.
        depth: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        learn_sigma: predict 2C channels (eps, then improved DDPM's variance values in [-1, 1]), the reference's
            default; ``False`` predicts eps only and sampling uses the fixed posterior variance.
    """

    def __init__(self, input_size: int = 32, in_channels: int = 3, num_classes: int = 10, patch_size: int = 4,
                 dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, learn_sigma: bool = True):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, dim)
        grid = self.x_embedder.grid_size
        self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(grid), dim).unsqueeze(0), persistent=False)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        projection = self.x_embedder.proj
        nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))  # as a Linear, not a conv
        nn.init.zeros_(projection.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp.fc1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp.fc2.weight, std=0.02)
        for modulation in [block.adaLN_modulation[1] for block in self.blocks] + [self.final_layer.adaLN_modulation[1]]:
            nn.init.zeros_(modulation.weight)  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        cond = self.t_embedder(t) + self.y_embedder(labels)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, cond)
        return unpatchify(self.final_layer(tokens, cond), self.patch_size, self.out_channels)  # (B, C or 2C, H, W)


def trainable_fraction(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total
