"""Which image patch tokens CLIP's online image tower keeps in a training step: injected by ``class_path``.

* ``RandomMasking``: FLIP (Li et al., 2023) keeps a random ``1 - ratio`` share of the patch tokens.
* ``AttentiveMasking``: Attentive Mask CLIP (Yang et al., 2023; microsoft/A-CLIP) keeps the tokens an EMA
  of the image encoder attends to most ([CLS] attention over all blocks), scored on the full view and
  cropped to the (smaller) view the online encoder sees; the EMA momentum rises on a half cosine.

Both see a timm ViT image tower through `masked_vit` (the one masked-ViT encoder).
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from modules.components.contrastive import (attentive_keep_index, cosine_momentum, crop_to_boxes, crop_token_scores,
                                            num_kept, random_keep_index, sample_crop_boxes)
from modules.components.errors import ConfigError
from modules.components.frozen import Frozen
from modules.components.masked_vit import cls_attention


class TokenMasking(nn.Module):
    """Drop ``ratio`` of the image patch tokens in training (evaluation always sees every token).

    Args:
        ratio: share of patch tokens dropped, in [0, 1) (FLIP: 0.5-0.75); ``int(N * (1 - ratio))`` are kept.
    """

    def __init__(self, ratio: float = 0.5):
        super().__init__()
        num_kept(1, ratio)  # validates the ratio
        self.ratio = ratio

    def bind(self, image_encoder: nn.Module) -> None:
        """Called once by the CLIP module with its image tower (a timm ViT: it must have patch tokens)."""
        if not hasattr(image_encoder, "patch_embed"):
            raise ConfigError(f"token masking needs a ViT image tower; {type(image_encoder).__name__} has no patch "
                              "tokens: set model.masking null")

    def view(self, images: torch.Tensor, image_encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images the online tower sees, kept patch indices (B, K))`` for this step."""
        raise NotImplementedError

    def update(self, image_encoder: nn.Module, step: int, total_steps: int) -> None:
        """After each optimizer step (a scorer follows the live encoder)."""


class RandomMasking(TokenMasking):
    """FLIP: a random subset of the patch tokens, drawn per sample."""

    def view(self, images: torch.Tensor, image_encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = image_encoder.patch_embed.num_patches
        keep = num_kept(num_tokens, self.ratio)
        return images, random_keep_index(images.shape[0], num_tokens, keep, device=images.device)


class AttentiveMasking(TokenMasking):
    """Attentive Mask CLIP: keep the tokens an EMA image encoder's [CLS] attends to most.

    Args:
        ratio: share of patch tokens dropped.
        ema_decay: EMA momentum of the scorer at the first step (A-CLIP: 0.996).
        ema_decay_end: momentum at the last step; it rises on a half cosine over the fit's optimizer steps
            (A-CLIP). Equal to ``ema_decay`` for a constant momentum.
        ema_warmup: instead of the cosine, timm ``ModelEmaV3``'s warm-up ``1 - (1 + step)^(-2/3)`` capped at
            ``ema_decay`` (this project's earlier rule, with 0.998): the scorer follows the live encoder early.
        attention_layers: blocks whose [CLS] attention scores the tokens, counted from the last (None = all,
            A-CLIP; 1 = the last block only).
        online_crop_scale: area share, of the scorer's full view (the loader's image), of the crop the online
            encoder sees; the scores are cropped to it (A-CLIP scores a larger view than the masked one).
            ``[1, 1]``: the same view for both.
    """

    def __init__(self, ratio: float = 0.5, ema_decay: float = 0.996, ema_decay_end: float = 1.0,
                 ema_warmup: bool = False, attention_layers: int | None = None,
                 online_crop_scale: tuple[float, float] = (0.5, 1.0)):
        super().__init__(ratio)
        low, high = online_crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"online_crop_scale {list(online_crop_scale)} must be area shares 0 < low <= high <= 1")
        self.ema_decay, self.ema_decay_end, self.ema_warmup = ema_decay, ema_decay_end, ema_warmup
        self.attention_layers, self.online_crop_scale = attention_layers, (float(low), float(high))
        self.scorer: Frozen | None = None  # never optimised, eval mode, checkpointed (its state is training state)

    def bind(self, image_encoder: nn.Module) -> None:
        super().bind(image_encoder)
        depth = len(image_encoder.blocks)
        if self.attention_layers is not None and not 1 <= self.attention_layers <= depth:
            raise ConfigError(f"attention_layers {self.attention_layers} must be in [1, {depth}] or null (all)")
        self.scorer = Frozen(ModelEmaV3(image_encoder, decay=self.ema_decay, use_warmup=self.ema_warmup), in_checkpoint=True)

    @property
    def ema(self) -> ModelEmaV3:
        """timm's EMA of the online image encoder (``.module`` is the network)."""
        return self.scorer.module

    def view(self, images: torch.Tensor, image_encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        patch_embed = image_encoder.patch_embed
        keep = num_kept(patch_embed.num_patches, self.ratio)
        scores = cls_attention(self.ema.module, images, self.attention_layers)  # (B, N), on the full view
        if self.online_crop_scale != (1.0, 1.0):
            boxes = sample_crop_boxes(images.shape[0], self.online_crop_scale, device=images.device)
            images = crop_to_boxes(images, boxes, tuple(images.shape[-2:]))
            scores = crop_token_scores(scores, tuple(patch_embed.grid_size), boxes)
        return images, attentive_keep_index(scores, keep)

    def momentum(self, step: int, total_steps: int) -> float:
        """The EMA momentum for the update after optimizer step ``step`` of ``total_steps`` (cosine, A-CLIP)."""
        if not total_steps:
            return self.ema_decay
        return cosine_momentum(step, total_steps, self.ema_decay, self.ema_decay_end)

    @torch.no_grad()
    def update(self, image_encoder: nn.Module, step: int, total_steps: int) -> None:
        if self.ema_warmup:
            self.ema.update(image_encoder, step=step)
        else:
            self.ema.decay = self.momentum(step, total_steps)
            self.ema.update(image_encoder)
