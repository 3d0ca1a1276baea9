"""Contrastive image-text pieces (pure torch): CLIP loss, DDP gathering, token keeping, zero-shot, recall@k.

CLIP (Radford et al., 2021): symmetric cross-entropy over the batch similarity matrix of L2-normalised
image and text embeddings, scaled by a learnable temperature (init 1/0.07, clamped at 100).
FLIP (Li et al., 2023) drops a random share of image tokens; Attentive Mask CLIP (Yang et al., 2023)
keeps the tokens an EMA image encoder scores as most relevant (its [CLS] attention over all layers,
computed on a larger view and cropped to the online view).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# --- temperature and loss ------------------------------------------------------------------------
class LogitScale(nn.Module):
    """Learnable logit scale (inverse temperature), stored as a log and clamped at ``max_value``.

    Args:
        init_value: initial scale (CLIP: 1/0.07).
        max_value: the scale never exceeds this (CLIP: 100); the forward clamps and ``clamp_()`` pulls
            the stored log back after an optimizer step so it cannot drift past the bound.
    """

    def __init__(self, init_value: float = 1 / 0.07, max_value: float = 100.0):
        super().__init__()
        self.max_value = max_value
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_value)))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_value)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, math.log(self.max_value))


def contrastive_loss_from_logits(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of a (N, N) image x text logits matrix whose pairs lie on the diagonal."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss of paired, L2-normalised (N, D) image and text features (row i of both is one pair)."""
    return contrastive_loss_from_logits(logit_scale * image_features @ text_features.t())  # (N, N)


# --- DDP -----------------------------------------------------------------------------------------
class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times ``factor`` backward (use `scale_gradient`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``factor`` (``-1``: gradient reversal)."""
    return _ScaleGradient.apply(x, factor)


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's features in rank order, gradients flowing to the local shard only.

    As in open_clip's ``loss.py`` (``gather_with_grad=False, local_loss=False``): the other ranks' features
    are constants and this rank's rows stay in the graph, so every rank computes the full loss of the
    global batch. The local shard's gradient is multiplied by the world size so that DDP's gradient
    *averaging* yields exactly the single-process gradient of the concatenated batch (the logit scale,
    live on every rank, already gets it). Returns the inputs unchanged outside an initialised group.
    All ranks must pass the same batch size (train loaders drop the last partial batch).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return image_features, text_features
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return image_features, text_features
    rank = dist.get_rank(group)
    gathered = []
    for local in (image_features, text_features):
        shards = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(shards, local.detach().contiguous(), group=group)
        shards[rank] = scale_gradient(local, float(world_size))
        gathered.append(torch.cat(shards))  # (world_size * B, D)
    return gathered[0], gathered[1]


# --- token keeping (FLIP / Attentive Mask CLIP; the encoder itself is `masked_vit`) ----------------
def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept when dropping ``mask_ratio`` of ``num_tokens``: ``int(N * (1 - ratio))`` as FLIP, at least one.

    FLIP's (and MAE's) ``len_keep = int(L * (1 - mask_ratio))`` truncates, so it can keep one token fewer than
    rounding the dropped count would (49 tokens at 0.5: 24 kept, not 25).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1 - mask_ratio)))


def random_keep_index(
    batch_size: int, num_tokens: int, keep: int, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """FLIP: ``keep`` distinct random token indices per sample, sorted.  # (B, keep)"""
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def attentive_keep_index(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Attentive Mask CLIP: the ``keep`` highest-scored tokens of (B, N) ``scores``, sorted.  # (B, keep)"""
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


# --- Attentive Mask CLIP views: the EMA scores the full view, the online encoder sees a crop -------
def sample_crop_boxes(
    batch_size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device=None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random resized-crop boxes ``(top, left, height, width)`` as fractions of the full view.  # (B, 4)

    The area share is uniform in ``scale`` and the log aspect ratio uniform in ``log(ratio)`` (as
    torchvision's RandomResizedCrop); a side longer than the view is clipped to it instead of redrawn.
    ``scale=(1, 1)`` with ``ratio=(1, 1)`` is the full view itself.
    """
    area = torch.empty(batch_size, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(batch_size, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()  # width / height
    height = (area / aspect).sqrt().clamp(max=1.0)
    width = (area * aspect).sqrt().clamp(max=1.0)
    top = torch.rand(batch_size, device=device, generator=generator) * (1 - height)
    left = torch.rand(batch_size, device=device, generator=generator) * (1 - width)
    return torch.stack([top, left, height, width], dim=1)


def crop_to_boxes(maps: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear crop-and-resize of (B, C, H, W) ``maps`` to the (B, 4) fractional ``boxes``.  # (B, C, h, w)

    Output cell centres sample the box (``align_corners=False``), so images and score maps cut with the same
    boxes stay aligned cell for cell. A-CLIP does the same to its attention map in three steps (upsample to
    the EMA crop's pixels, cut the online crop, resample to the patch grid).
    """
    out_h, out_w = size
    rows = (torch.arange(out_h, device=maps.device, dtype=maps.dtype) + 0.5) / out_h  # (h,) in [0, 1]
    cols = (torch.arange(out_w, device=maps.device, dtype=maps.dtype) + 0.5) / out_w
    boxes = boxes.to(maps.dtype)
    y = boxes[:, 0, None] + rows[None] * boxes[:, 2, None]  # (B, h) in full-view fractions
    x = boxes[:, 1, None] + cols[None] * boxes[:, 3, None]  # (B, w)
    grid = torch.stack([x[:, None, :].expand(-1, out_h, -1), y[:, :, None].expand(-1, -1, out_w)], dim=-1)
    return F.grid_sample(maps, grid * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)


def crop_token_scores(scores: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor) -> torch.Tensor:
    """Map (B, N) patch scores of the full view onto the same-size patch grid of the cropped views.  # (B, N)"""
    maps = scores.view(scores.shape[0], 1, *grid)
    return crop_to_boxes(maps, boxes, grid).flatten(1)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum rising from ``base`` to ``final`` on a half cosine over ``total_steps`` (A-CLIP, after BYOL/DINO).

    ``final + (base - final) * (1 + cos(pi * step / total_steps)) / 2``: 0.996 at step 0, 0.998 half-way,
    1 at the end.
    """
    progress = min(max(step, 0), total_steps) / max(1, total_steps)
    return final + (base - final) * (1 + math.cos(math.pi * progress)) / 2


# --- zero-shot and retrieval ---------------------------------------------------------------------
def zero_shot_head(class_text_features: torch.Tensor) -> torch.Tensor:
    """Prompt-ensemble classifier: (C, T, D) text features of C classes x T templates -> (C, D) unit rows.

    Each prompt embedding is normalised, averaged over templates and normalised again (CLIP).
    """
    mean = F.normalize(class_text_features, dim=-1).mean(dim=1)
    return F.normalize(mean, dim=-1)


def zero_shot_logits(image_features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of (B, D) image features to each class row of the head.  # (B, C)"""
    return F.normalize(image_features, dim=-1) @ head.t()


def recall_at_k(
    similarity: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, torch.Tensor]:
    """Fraction of queries with a matching gallery item among their top-k (rows of ``similarity`` are queries).

    A gallery item matches a query when their ids are equal: pair ids for captioned data; for captions
    built from labels every identical caption matches.
    """
    matches = query_ids[:, None] == gallery_ids[None, :]  # (Q, G)
    order = similarity.argsort(dim=1, descending=True)
    ranked = matches.gather(1, order)
    return {k: ranked[:, :k].any(dim=1).float().mean() for k in ks}
