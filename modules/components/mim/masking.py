"""Masks, patch (un)folding and masked reconstruction losses for masked image modeling (pure torch).

Masks are drawn on the batch's device inside the training step, never in the data loader, so any
DataModule feeds SimMIM / MAE / MR-MAE unchanged. Conventions: a token mask is ``(B, N)`` bool with
``True`` = masked (hidden from the encoder, reconstructed by the loss); tokens are in row-major order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def simmim_num_masked(num_units: int, mask_ratio: float) -> int:
    """SimMIM's masked mask-patch count, ``ceil(count * ratio)`` as its reference (49 at 0.6 -> 30)."""
    _check_ratio(mask_ratio)
    return min(math.ceil(num_units * mask_ratio), num_units - 1)


def mae_num_kept(num_tokens: int, mask_ratio: float) -> int:
    """MAE's visible-token count, ``int(L * (1 - ratio))`` as its reference (196 at 0.75 -> 49)."""
    _check_ratio(mask_ratio)
    keep = int(num_tokens * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible token out of {num_tokens}")
    return keep


def random_token_order(batch_size: int, num_tokens: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of ``range(num_tokens)`` per sample, drawn on ``device``.  # (B, N)"""
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    return noise.argsort(dim=1)


def simmim_mask(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_patch_cells: int,
    mask_ratio: float,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SimMIM mask: whole ``mask_patch_cells x mask_patch_cells`` blocks of tokens, exact count per sample.

    Args:
        batch_size: samples.
        grid_size: token grid ``(h, w)`` of the encoder (image size / patch size).
        mask_patch_cells: mask-patch side in tokens (mask-patch pixels / model patch pixels).
        mask_ratio: fraction of mask patches hidden; the count is exactly ``ceil(ratio * n)`` (`simmim_num_masked`).
        device: where the mask lives (the batch's device).
        generator: optional RNG for reproducible masks (e.g. validation).

    Returns:
        ``(B, h * w)`` bool token mask, True = masked.
    """
    h, w = grid_size
    if h % mask_patch_cells or w % mask_patch_cells:
        raise ValueError(f"token grid {grid_size} is not divisible by the mask patch ({mask_patch_cells} tokens)")
    mh, mw = h // mask_patch_cells, w // mask_patch_cells
    order = random_token_order(batch_size, mh * mw, device, generator)
    block_mask = order.argsort(dim=1) < simmim_num_masked(mh * mw, mask_ratio)  # rank < k: exactly k True  # (B, mh*mw)
    block_mask = block_mask.view(batch_size, mh, 1, mw, 1)
    token_mask = block_mask.expand(batch_size, mh, mask_patch_cells, mw, mask_patch_cells)
    return token_mask.reshape(batch_size, h * w)


def mae_shuffle(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random shuffle with an exact keep count.

    Returns:
        ids_keep ``(B, K)`` indices of the visible tokens (K = int(N * (1 - ratio)), `mae_num_kept`),
        ids_restore ``(B, N)`` inverse permutation (unshuffles encoder+mask tokens),
        mask ``(B, N)`` bool, True = masked, in the original token order.
    """
    order = random_token_order(batch_size, num_tokens, device, generator)  # (B, N)
    ids_restore = order.argsort(dim=1)
    keep = mae_num_kept(num_tokens, mask_ratio)
    ids_keep = order[:, :keep]
    mask = ids_restore >= keep
    return ids_keep, ids_restore, mask


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``tokens[b, ids[b]]`` for (B, N, D) tokens and (B, K) indices.  # (B, K, D)"""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), row-major patches, pixels ordered (py, px, c)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p * p * C) -> (B, C, H, W)."""
    b = patches.shape[0]
    (h, w), p = grid_size, patch_size
    x = patches.reshape(b, h, w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, h * p, w * p)


def token_mask_to_pixels(mask: torch.Tensor, grid_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, N) token mask -> (B, 1, H, W) float pixel mask (1 = masked)."""
    b = mask.shape[0]
    h, w = grid_size
    pixel = mask.view(b, 1, h, w).float()
    return pixel.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def normalized_patch_targets(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-patch normalised pixel targets: ``(x - mean) / sqrt(var + eps)``, *unbiased* variance.

    The unbiased (P - 1) variance and eps 1e-6 are the reference's (``norm_pix_loss``).

    Returns:
        targets ``(B, N, P)``, and the per-patch mean and std ``(B, N, 1)`` to undo it for display.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_l1_loss(prediction: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: mean absolute error over masked pixels only.

    Args:
        prediction: (B, C, H, W) predicted pixels.
        target: (B, C, H, W) input pixels.
        pixel_mask: (B, 1, H, W), 1 where masked.
    """
    channels = prediction.shape[1]
    error = (prediction - target).abs() * pixel_mask
    return error.sum() / (pixel_mask.sum() * channels).clamp_min(1.0)


def masked_mse_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: per-patch MSE averaged over masked patches only.

    Args:
        prediction: (B, N, P) predicted patch pixels.
        target: (B, N, P) target patch pixels.
        mask: (B, N) bool, True where masked.
    """
    per_patch = (prediction - target).pow(2).mean(dim=-1)  # (B, N)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def mask_as_pixels(images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Masked input for display: masked pixels set to the batch minimum (black after min-max scaling)."""
    fill = images.amin()
    return images * (1 - pixel_mask) + fill * pixel_mask


def fixed_generator(device, seed: int) -> torch.Generator:
    """A seeded RNG on ``device`` (reproducible validation masks)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def reconstruction_rows(images: torch.Tensor, pixel_mask: torch.Tensor, reconstruction: torch.Tensor,
                        count: int = 8) -> torch.Tensor:
    """Input / masked input / reconstruction of the first ``count`` samples, stacked row by row.  # (3n, C, H, W)"""
    n = min(count, images.shape[0])
    images, pixel_mask = images[:n].detach(), pixel_mask[:n]
    return torch.cat([images, mask_as_pixels(images, pixel_mask), reconstruction[:n].detach()])
