"""Which image patch tokens CLIP's online image tower keeps in a training step: injected by ``class_path``.

* ``RandomMasking``: FLIP (Li et al., 2023) keeps a random ``1 - ratio`` share of the patch tokens.
* ``AttentiveMasking``: Attentive Mask CLIP (Yang et al., 2023; microsoft/A-CLIP) keeps the 2x2 token blocks
  an EMA of the image encoder attends to most ([CLS] attention over all blocks, :func:`attentive_block_keep_index`),
  scored on the full view and cropped to the (smaller) view the online encoder sees; the EMA momentum rises on a
  half cosine.
* ``GridMasking``: MAE's grid-wise sampling ablation (He et al., 2022, Table 1f / Fig. 6) keeps one patch of every
  ``stride x stride`` cell of the patch grid (:func:`grid_keep_index`), at an offset drawn per image.

All see a timm ViT image tower through `masked_vit` (the one masked-ViT encoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from modules.components.contrastive import (attentive_keep_index, cosine_momentum, crop_to_boxes, crop_token_scores,
                                            num_kept, random_keep_index, sample_crop_boxes)
from modules.components.errors import ConfigError
from modules.components.frozen import Frozen
from modules.components.parts import Part
from modules.components.masked_vit import cls_attention


SELECTIONS = ("blocks", "tokens")


def kept_blocks(num_blocks: int, keep_ratio: float) -> int:
    """A-CLIP's block count: ``int(num_blocks * keep_ratio) + 1``, at most ``num_blocks`` (its ``N + 1`` top blocks).

    The reference keeps one block more than the truncated share: 25 of 49 blocks at keep ratio 0.5.
    """
    return min(num_blocks, int(num_blocks * keep_ratio) + 1)


def attentive_block_keep_index(scores: torch.Tensor, grid: tuple[int, int], keep_ratio: float) -> torch.Tensor:
    """Attentive Mask CLIP's block selection: the tokens of the top-scored 2x2 token blocks, sorted.  # (B, K)

    A-CLIP's ``get_att_mask`` (hard-coded for 14x14 tokens and keep ratio 0.5) pools the [CLS] attention map to
    7x7 (bilinear resizing by 1/2, i.e. the mean of each 2x2 block), keeps the ``int(49 * 0.5) + 1 = 25``
    highest blocks and unmasks all 4 tokens of each: 100 of 196 tokens. The rule here, for any grid and ratio:

    * blocks are the 2x2 cells of the token grid; an odd side ends in a row or column of partial (2x1, 1x2,
      1x1) blocks, ``ceil(H / 2) * ceil(W / 2)`` blocks in all; a block's score is the mean of its tokens;
    * :func:`kept_blocks` of them are kept, and K = ``N * kept_blocks // num_blocks`` tokens (every sample keeps
      the same count, as a batch of token sequences needs). On an even grid that is exactly the tokens of the
      top blocks: 14x14 at keep 0.5, 25 blocks = 100 tokens; 8x8 (16 blocks) at keep 0.5, 9 blocks = 36 tokens,
      at keep 0.25, 5 blocks = 20 tokens. On an odd grid the tokens are taken block by block in score order
      (within a block by the token's own score) until K are taken (7x7 at keep 0.5: 16 blocks, 9 kept, 27 tokens).

    Ties between equal block scores go to the lower block index (the reference's ``argsort`` leaves them open).
    """
    batch, num_tokens = scores.shape
    height, width = grid
    maps = scores.view(batch, 1, height, width)
    block_scores = F.avg_pool2d(maps, 2, ceil_mode=True).flatten(1)  # (B, nb): partial blocks average what they hold
    num_blocks = block_scores.shape[1]
    keep = num_tokens * kept_blocks(num_blocks, keep_ratio) // num_blocks
    rank = torch.empty_like(block_scores, dtype=torch.long)
    order = block_scores.argsort(dim=1, descending=True, stable=True)
    rank.scatter_(1, order, torch.arange(num_blocks, device=scores.device).expand(batch, -1))  # (B, nb) 0 = best
    rows = torch.arange(height, device=scores.device) // 2
    cols = torch.arange(width, device=scores.device) // 2
    token_block = (rows[:, None] * ((width + 1) // 2) + cols[None, :]).flatten()  # (N,) block of each token
    by_score = scores.argsort(dim=1, descending=True, stable=True)  # tokens by own score, then by block rank:
    block_rank = rank[:, token_block].gather(1, by_score)
    by_block = block_rank.argsort(dim=1, stable=True)
    return by_score.gather(1, by_block)[:, :keep].sort(dim=1).values


class TokenMasking(nn.Module, Part):
    """Drop ``ratio`` of the image patch tokens in training (evaluation always sees every token).

    A new strategy implements :meth:`view` (and :meth:`update` if it keeps state) and passes its ``ratio`` to
    this constructor even where it derives it (``GridMasking``: ``1 - 1/stride**2``): the CLIP module reads
    ``masking.ratio`` and masks nothing while it is 0, and FLIP's unmasked tuning switches on that.

    Args:
        ratio: share of patch tokens dropped, in [0, 1) (FLIP: 0.5-0.75); ``int(N * (1 - ratio))`` are kept.
    """

    def __init__(self, ratio: float = 0.5):
        super().__init__()
        num_kept(1, ratio)  # validates the ratio
        self.ratio = ratio

    def bind(self, host) -> None:
        """Reads the CLIP module's image tower ``host.model.image_trunk`` (a timm ViT: it must have patch tokens)."""
        image_encoder = host.model.image_trunk
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
    """Attentive Mask CLIP: keep the 2x2 token blocks an EMA image encoder's [CLS] attends to most.

    Args:
        ratio: share of patch tokens dropped; A-CLIP's keep ratio is ``1 - ratio``. With ``selection="blocks"``
            slightly more are kept than ``1 - ratio`` (the reference's one extra block; see
            :func:`attentive_block_keep_index`): 36 of 64 tokens at 0.5, 20 of 64 at 0.75 on an 8x8 grid.
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
        selection: ``blocks`` (default): A-CLIP's ``get_att_mask``, the top 2x2 token blocks by mean score;
            ``tokens``: the top ``int(N * (1 - ratio))`` single tokens, this project's earlier rule (exactly
            FLIP's token count at the same ratio, for comparisons with random masking at equal compute).
    """

    def __init__(self, ratio: float = 0.5, ema_decay: float = 0.996, ema_decay_end: float = 1.0,
                 ema_warmup: bool = False, attention_layers: int | None = None,
                 online_crop_scale: tuple[float, float] = (0.5, 1.0), selection: str = "blocks"):
        super().__init__(ratio)
        if selection not in SELECTIONS:
            raise ConfigError(f"token selection must be one of {SELECTIONS}, not {selection!r}")
        self.selection = selection
        low, high = online_crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"online_crop_scale {list(online_crop_scale)} must be area shares 0 < low <= high <= 1")
        self.ema_decay, self.ema_decay_end, self.ema_warmup = ema_decay, ema_decay_end, ema_warmup
        self.attention_layers, self.online_crop_scale = attention_layers, (float(low), float(high))
        self.scorer: Frozen | None = None  # never optimised, eval mode, checkpointed (its state is training state)

    def bind(self, host) -> None:
        super().bind(host)
        image_encoder = host.model.image_trunk
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
        grid = tuple(patch_embed.grid_size)
        scores = cls_attention(self.ema.module, images, self.attention_layers)  # (B, N), on the full view
        if self.online_crop_scale != (1.0, 1.0):
            boxes = sample_crop_boxes(images.shape[0], self.online_crop_scale, device=images.device)
            images = crop_to_boxes(images, boxes, tuple(images.shape[-2:]))
            scores = crop_token_scores(scores, grid, boxes)
        if self.selection == "blocks":
            return images, attentive_block_keep_index(scores, grid, 1 - self.ratio)
        return images, attentive_keep_index(scores, num_kept(patch_embed.num_patches, self.ratio))

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


def grid_keep_index(offsets: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """MAE's grid-wise sampling: per sample, the patch at ``offsets[b] = (dy, dx)`` of every cell.  # (B, K)

    The ``H x W`` patch grid (``stride`` divides both sides) is cut into ``stride x stride`` cells; sample ``b``
    keeps patch ``(cy * stride + dy, cx * stride + dx)`` of cell ``(cy, cx)``, as a row-major patch index.
    ``K = H * W / stride**2``; cells are taken in row-major order, so the indices come out sorted.
    """
    height, width = grid
    rows = torch.arange(0, height, stride, device=offsets.device)[None, :, None] + offsets[:, 0, None, None]
    cols = torch.arange(0, width, stride, device=offsets.device)[None, None, :] + offsets[:, 1, None, None]
    return (rows * width + cols).flatten(1)  # (B, H/s, W/s) -> (B, K)


def random_grid_keep_index(batch_size: int, grid: tuple[int, int], stride: int, device=None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`grid_keep_index` at a uniform random offset ``(dy, dx)`` in ``[0, stride)^2`` per sample.  # (B, K)"""
    offsets = torch.randint(stride, (batch_size, 2), device=device, generator=generator)  # (B, 2)
    return grid_keep_index(offsets, grid, stride)


class GridMasking(TokenMasking):
    """MAE's grid-wise sampling (He et al., 2022, Table 1f / Fig. 6): keep one patch of every ``stride x stride`` cell.

    MAE's ablation "regularly keeps one of every four patches" (75% masking) and reports it worse than random
    masking (an easier task); facebookresearch/mae ships only random masking, so this follows the paper's text.
    Where visionlab differs: the kept position inside the cells (the same for every cell of an image) is drawn per
    image from the global RNG, so different images of a batch keep different patches; MAE's figure shows one fixed
    pattern. Used here as a CLIP (FLIP-style) token masking, not for MAE's reconstruction.

    Args:
        stride: side of the cells, in patches; it must divide both sides of the patch grid. The share dropped is
            ``ratio = 1 - 1 / stride**2`` (0.75 at 2, MAE's setting); 1 keeps every token.
    """

    def __init__(self, stride: int = 2):
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ConfigError(f"grid masking stride must be a whole number of patches >= 1, not {stride!r}")
        super().__init__(1 - 1 / stride**2)
        self.stride = stride

    def bind(self, host) -> None:
        super().bind(host)
        height, width = host.model.image_trunk.patch_embed.grid_size
        if height % self.stride or width % self.stride:
            raise ConfigError(f"grid masking stride {self.stride} does not divide the {height}x{width} patch grid: "
                              "set model.masking.init_args.stride to a divisor of both sides")

    def view(self, images: torch.Tensor, image_encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        grid = tuple(image_encoder.patch_embed.grid_size)
        return images, random_grid_keep_index(images.shape[0], grid, self.stride, device=images.device)
