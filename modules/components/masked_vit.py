"""One masked-ViT encoder: SimMIM's mask tokens, MAE's visible-only tokens and CLIP's token dropping.

Every function runs an unmodified timm ``VisionTransformer`` through timm's own steps, in timm's order
(``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``; see
``VisionTransformer.forward_features``) and changes only *which* tokens enter the blocks:

- SimMIM: masked patch embeddings are replaced by a learnable token *before* the position embedding;
- MAE / MR-MAE: only the kept patch tokens (in the order given) enter the blocks, the prefix tokens always;
- FLIP / Attentive Mask CLIP: the same token keeping, then timm's own pooling (``forward_head``).

With nothing masked and nothing dropped the output equals ``forward_features`` exactly, so the weights keep
timm's names and semantics and a pretraining checkpoint fine-tunes as a plain timm classifier.
``set_grad_checkpointing`` is honoured as in ``forward_features``.
"""

from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from modules.components.errors import ConfigError


def require_vit(model: nn.Module, technique: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{technique} needs a timm VisionTransformer backbone (e.g. vit_tiny_patch16_224), got {type(model).__name__}")
    return model


def vit_geometry(vit: VisionTransformer) -> tuple[tuple[int, int], int]:
    """Token grid ``(h, w)`` and (square) patch size of a timm ViT."""
    grid = tuple(vit.patch_embed.grid_size)
    patch = vit.patch_embed.patch_size
    return grid, int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def with_mask_token(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Patch embeddings ``(B, ..., D)`` with the masked ones (``mask`` of the same leading shape) replaced."""
    weight = mask.view(*x.shape[:-1], 1).to(x.dtype)
    return x * (1 - weight) + mask_token.reshape(-1).to(x.dtype) * weight


def embed_tokens(vit: VisionTransformer, images: torch.Tensor, mask: torch.Tensor | None = None,
                 mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Prefix tokens then patch tokens, position-embedded (timm's ``patch_embed`` + ``_pos_embed``).  # (B, P+N, D)

    ``mask`` (B, N) replaces those patch embeddings by ``mask_token`` (1, 1, D) before the position
    embedding is added, as SimMIM does.
    """
    if not vit.dynamic_img_size and tuple(images.shape[-2:]) != tuple(vit.patch_embed.img_size):
        raise ConfigError(f"images are {tuple(images.shape[-2:])} px but the ViT was built for "
                          f"{tuple(vit.patch_embed.img_size)}: feed images of the model's image_size")
    x = vit.patch_embed(images)
    if mask is not None:
        x = with_mask_token(x, mask, mask_token)
    # `_pos_embed` is the step of timm's own forward_features that adds prefix tokens and position
    # embeddings (resampled under dynamic_img_size); calling it keeps every ViT variant's rule in timm.
    return vit._pos_embed(x)


def keep_tokens(tokens: torch.Tensor, keep_index: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The prefix tokens and the patch tokens ``keep_index`` (B, K), in that order.  # (B, P+K, D)"""
    patches = tokens[:, num_prefix_tokens:]
    kept = patches.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :num_prefix_tokens], kept], dim=1)


def run_blocks(vit: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """timm's ``patch_drop``, ``norm_pre``, blocks (checkpointed if enabled) and ``norm``.  # (B, L, D)"""
    x = vit.norm_pre(vit.patch_drop(tokens))
    x = checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing else vit.blocks(x)
    return vit.norm(x)


def encode(vit: VisionTransformer, images: torch.Tensor, *, mask: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None, keep_index: torch.Tensor | None = None) -> torch.Tensor:
    """Encoded tokens: prefix first, then every patch (``keep_index=None``) or the kept ones.  # (B, P+K, D)

    Args:
        vit: a timm VisionTransformer.
        images: (B, C, H, W) at the model's image size.
        mask: (B, N) bool, patches replaced by ``mask_token`` (SimMIM).
        mask_token: (1, 1, D) learnable token, with ``mask``.
        keep_index: (B, K) patch indices that enter the blocks, in this order (MAE's shuffle, FLIP's
            random or A-CLIP's attentive keep); position embeddings are added before tokens are dropped.
    """
    x = embed_tokens(vit, images, mask, mask_token)
    if keep_index is not None:
        x = keep_tokens(x, keep_index, vit.num_prefix_tokens)
    return run_blocks(vit, x)


def encode_pooled(vit: VisionTransformer, images: torch.Tensor, keep_index: torch.Tensor | None = None) -> torch.Tensor:
    """timm's pooled pre-logits features of the (token-dropped) encoder.  # (B, D)

    ``keep_index=None`` equals ``vit.forward_head(vit.forward_features(images), pre_logits=True)``.
    """
    return vit.forward_head(encode(vit, images, keep_index=keep_index), pre_logits=True)


@torch.no_grad()
def cls_attention(vit: VisionTransformer, images: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
    """Relevance of each patch: [CLS]'s attention to it, averaged over heads and layers.  # (B, N)

    Attentive Mask CLIP (Yang et al., 2023; microsoft/A-CLIP ``MaskVisionTransformer``) averages the
    attention matrices of *all* blocks of the EMA encoder, takes the [CLS] row's weights on the patches
    (softmax over every token, [CLS] included) and averages the heads. ``num_layers`` keeps only the last
    that many blocks (1 = the last block only). Without a class token the mean patch query stands in for it.
    """
    depth = len(vit.blocks)
    first = 0 if num_layers is None else depth - num_layers
    if not 0 <= first < depth:
        raise ValueError(f"num_layers must be in [1, {depth}], got {num_layers}")
    prefix = vit.num_prefix_tokens
    x = vit.norm_pre(vit.patch_drop(embed_tokens(vit, images)))  # (B, P+N, D)
    total = None
    for index, block in enumerate(vit.blocks):
        if index >= first:
            attn = block.attn
            y = block.norm1(x)
            batch, length, _ = y.shape
            qkv = attn.qkv(y).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, H, L, hd)
            query = q[:, :, :1] if prefix > 0 else q.mean(dim=2, keepdim=True)  # (B, H, 1, hd)
            weights = ((query * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0, prefix:]  # (B, H, N)
            total = weights if total is None else total + weights
        if index < depth - 1:
            x = block(x)
    return (total / (depth - first)).mean(dim=1)  # (B, N)
