"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2022)."""

from __future__ import annotations

import torch

from modules.base import MaskedPretrainingModule
from modules.components.mim.masking import reconstruction_rows
from modules.components.mim.encoders import (
    mae_encoder_decoder,
    mae_reconstruct,
)
from modules.components.optim import OptimConfig


class MAEModule(MaskedPretrainingModule):
    """MAE pretraining: the ViT encoder runs on the visible 25% of tokens, a light decoder adds mask tokens.

    The loss is MSE on masked patches against per-patch-normalised pixels. Encoder and decoder are initialised
    as the reference (Xavier-uniform Linear and patch-embedding weights, fixed sin-cos position embeddings,
    LayerNorm eps 1e-6); its AdamW betas (0.9, 0.95) and base-lr rule are set in ``optim``. The encoder is an unmodified
    timm ViT (``self.backbone``, timm's key names), so ``ClassificationModule(init_checkpoint=...)``
    fine-tunes it and ``LinearProbeModule`` probes it.

    Args:
        backbone: timm ViT name.
        num_classes: classes of the data (only sizes the unused classifier; linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments (``patch_size``, ``depth``, ``embed_dim``...).
        mask_ratio: fraction of patches hidden from the encoder; ``int(N * (1 - mask_ratio))`` stay visible.
        norm_pix_loss: per-patch normalised pixel targets (unbiased variance, eps 1e-6, as the reference).
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        learned_pos_embed: trained position embeddings in encoder and decoder instead of the reference's
            fixed 2-D sin-cos tables (zero row for the class token).
        log_images_every_n_steps: period of the input / masked / reconstruction grid (``mim/recon``); 0 disables.
        optim: optimizer and schedule.
    """

    weight_decay_rule = "bias_norm"  # MAE main_pretrain.py: timm add_weight_decay, no skip list (tokens decay)

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        image_size: int = 224,
        backbone_kwargs: dict | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        learned_pos_embed: bool = False,
        log_images_every_n_steps: int = 500,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.save_hyperparameters()
        self.backbone, self.decoder, _ = mae_encoder_decoder(backbone, num_classes, image_size, backbone_kwargs, "MAE",
                                                             decoder_dim, decoder_depth, decoder_heads, learned_pos_embed)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.log_every = log_images_every_n_steps

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return mae_reconstruct(self.backbone, self.decoder, images, self.mask_ratio, self.norm_pix_loss, generator)

    def _log_grid(self, tag: str, images: torch.Tensor, out: dict) -> None:
        rows = reconstruction_rows(images, out["pixel_mask"], out["reconstruction"])
        self.log_images(tag, rows, nrow=rows.shape[0] // 3)
