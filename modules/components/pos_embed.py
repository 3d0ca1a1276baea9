"""Fixed 2-D sine-cosine position embeddings as MAE's reference builds them (pure torch)."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 2))``, k < dim / 2.  # (M, dim)"""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.reshape(-1, 1).to(torch.float64) * omega  # (M, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table: ``(1, P + h * w, dim)``, zero rows for the P prefix (class) tokens.

    Tokens are row-major; the first half of the channels encodes the column, the second half the row,
    the layout of the reference's ``get_2d_sincos_pos_embed`` (so its checkpoints line up).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (h * w, dim)
    table = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=table.dtype), table])
    return table.float().unsqueeze(0)
