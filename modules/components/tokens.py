"""Token-grid helpers shared by MIM, KD and CLIP (pure torch): grid resampling and the feature-mimicking loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_tokens(tokens: torch.Tensor, grid_size: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample (B, h*w, D) tokens on a grid to another grid (bilinear).  # (B, h'*w', D)"""
    if tuple(grid_size) == tuple(new_grid):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid_size)
    x = F.interpolate(x, size=new_grid, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def feature_mimic_loss(prediction: torch.Tensor, target: torch.Tensor, normalize_target: bool = True) -> torch.Tensor:
    """MSE between projected student tokens and (layer-normalised) teacher tokens, both (B, K, D_t)."""
    if normalize_target:
        target = F.layer_norm(target, target.shape[-1:])
    return F.mse_loss(prediction, target)
