"""SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., 2022)."""

from __future__ import annotations

import torch
from timm.models import VisionTransformer
from torch import nn

from modules.base import MaskedPretrainingModule
from modules.components.errors import ConfigError
from modules.components.mim.masking import (
    masked_l1_loss,
    reconstruction_rows,
    simmim_mask,
    token_mask_to_pixels,
)
from modules.components.mim.encoders import (
    embed_dim_of,
    masked_feature_map,
    patch_embed_grid,
    patch_size_of,
    pretraining_backbone,
)
from modules.components.optim import OptimConfig


class SimMIMModule(MaskedPretrainingModule):
    """SimMIM pretraining: large random mask patches, a learnable mask token, one linear pixel predictor, L1.

    The mask token replaces masked patch embeddings inside an unmodified timm ViT, BEiT or Swin (``self.backbone``,
    saved under timm's names so ``ClassificationModule(init_checkpoint=...)`` fine-tunes it directly).
    A 1x1 convolution (a per-location linear layer) predicts the raw (normalised) pixels of each
    output-stride cell; the L1 loss counts masked pixels only.

    Args:
        backbone: timm ViT, BEiT or Swin name. SimMIM's own ViT (layer scale, one relative position bias
            shared by all blocks, no absolute position embedding) is timm's ``beit_*`` with
            ``use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=False, init_values=0.1``.
        num_classes: classes of the data (only sizes the unused classifier; linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments (``patch_size``, ``depth``, ``embed_dim``...).
        mask_patch_size: side of a mask patch in pixels (a multiple of the model's patch size).
        mask_ratio: fraction of mask patches hidden: ``ceil(count * mask_ratio)`` per sample, as the reference.
        log_images_every_n_steps: period of the input / masked / reconstruction grid (``mim/recon``); 0 disables.
        optim: optimizer and schedule.
    """

    weight_decay_rule = "bias_norm_listed"  # SimMIM optimizer.py: 1-d, biases and the model's no_weight_decay()

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        image_size: int = 224,
        backbone_kwargs: dict | None = None,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        log_images_every_n_steps: int = 500,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.save_hyperparameters()
        self.backbone = pretraining_backbone(backbone, num_classes, image_size, backbone_kwargs)
        self.patch_size = patch_size_of(self.backbone)
        self.grid_size = patch_embed_grid(self.backbone)
        if mask_patch_size % self.patch_size or image_size % mask_patch_size:
            raise ConfigError(
                f"mask_patch_size {mask_patch_size} must be a multiple of the model patch ({self.patch_size}) "
                f"and divide image_size {image_size}"
            )
        self.mask_patch_cells = mask_patch_size // self.patch_size
        self.mask_ratio = mask_ratio
        self.log_every = log_images_every_n_steps
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim_of(self.backbone)))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        stride = int(self.backbone.feature_info[-1]["reduction"])
        self.predictor = nn.Sequential(  # one linear layer per output cell, then cells -> pixels
            nn.Conv2d(self.backbone.num_features, stride * stride * 3, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    def no_weight_decay(self) -> set[str]:
        """SimMIM's Swin lists its mask token here (``SwinTransformerForSimMIM``); its ViT does not, so it decays."""
        return set() if isinstance(self.backbone, VisionTransformer) else {"mask_token"}

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        mask = simmim_mask(images.shape[0], self.grid_size, self.mask_patch_cells, self.mask_ratio, images.device, generator)
        features = masked_feature_map(self.backbone, images, mask, self.mask_token)  # (B, D, h, w)
        prediction = self.predictor(features)  # (B, 3, H, W)
        pixel_mask = token_mask_to_pixels(mask, self.grid_size, self.patch_size)  # (B, 1, H, W)
        loss = masked_l1_loss(prediction, images, pixel_mask)
        return {"loss": loss, "mask": mask, "pixel_mask": pixel_mask, "prediction": prediction}

    def _log_grid(self, tag: str, images: torch.Tensor, out: dict) -> None:
        shown = images * (1 - out["pixel_mask"]) + out["prediction"] * out["pixel_mask"]
        rows = reconstruction_rows(images, out["pixel_mask"], shown)
        self.log_images(tag, rows, nrow=rows.shape[0] // 3)
