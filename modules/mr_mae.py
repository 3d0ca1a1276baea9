"""MR-MAE: Mimic before Reconstruct: Enhancing Masked Autoencoders with Feature Mimicking (Gao et al., 2023)."""

from __future__ import annotations

import torch
from torch import nn

from modules.base import MaskedPretrainingModule
from modules.components.masking import gather_tokens, reconstruction_rows
from modules.components.mim_parts import (
    feature_mimic_loss,
    frozen_encoder,
    mae_encoder_decoder,
    mae_reconstruct,
    teacher_tokens,
)
from modules.components.optim import OptimConfig


class MRMAEModule(MaskedPretrainingModule):
    """MR-MAE pretraining: MAE plus a mimic loss of the encoder's visible tokens against a frozen teacher.

    ``loss = recon_weight * MSE(masked patches) + mimic_weight * MSE(proj(visible tokens), teacher tokens)``.
    The teacher (a timm model by name, optionally loaded from a visionlab checkpoint) is frozen, kept in
    eval mode, outside the optimizer, and left out of saved checkpoints (it is rebuilt from its config).

    Args:
        backbone: timm ViT name of the student encoder.
        num_classes: classes of the data (only sizes the unused classifier; linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments for the student.
        teacher: timm model name of the teacher (never downloaded).
        teacher_checkpoint: a visionlab checkpoint (or plain state dict) with the teacher's ``backbone.*``
            weights; ``None`` keeps a randomly initialised teacher (only useful for smoke tests).
        teacher_kwargs: extra ``timm.create_model`` arguments for the teacher.
        mask_ratio: fraction of patches hidden from the encoder.
        norm_pix_loss: per-patch normalised pixel targets.
        recon_weight: weight of the pixel reconstruction loss.
        mimic_weight: weight of the feature mimic loss.
        projection_dim: hidden width of the 2-layer projection; 0 for a single linear layer.
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        log_images_every_n_steps: period of the ``mim/recon`` image grid; 0 disables.
        optim: optimizer and schedule.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        image_size: int = 224,
        backbone_kwargs: dict | None = None,
        teacher: str = "vit_tiny_patch16_224",
        teacher_checkpoint: str | None = None,
        teacher_kwargs: dict | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        recon_weight: float = 1.0,
        mimic_weight: float = 1.0,
        projection_dim: int = 0,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        log_images_every_n_steps: int = 500,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.save_hyperparameters()
        self.backbone, self.decoder, self.grid_size = mae_encoder_decoder(
            backbone, num_classes, image_size, backbone_kwargs, "MR-MAE", decoder_dim, decoder_depth, decoder_heads)
        self.teacher = frozen_encoder(teacher, image_size, teacher_checkpoint, teacher_kwargs)
        dim, teacher_dim = self.backbone.embed_dim, self.teacher.num_features
        if projection_dim:
            self.projection = nn.Sequential(nn.Linear(dim, projection_dim), nn.GELU(), nn.Linear(projection_dim, teacher_dim))
        else:
            self.projection = nn.Linear(dim, teacher_dim)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.recon_weight, self.mimic_weight = recon_weight, mimic_weight
        self.log_every = log_images_every_n_steps

    # --- the teacher stays frozen, in eval mode and out of checkpoints -------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.teacher.state_dict().items():
            state.setdefault(f"teacher.{key}", value)

    # --- steps -------------------------------------------------------------------------------------
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = mae_reconstruct(self.backbone, self.decoder, images, self.mask_ratio, self.norm_pix_loss, generator)
        with torch.no_grad():
            target = teacher_tokens(self.teacher, images, self.grid_size)  # (B, N, D_t)
        target = gather_tokens(target, out["ids_keep"])  # (B, K, D_t)
        visible = out["latent"][:, self.backbone.num_prefix_tokens:]  # (B, K, D)
        out["recon_loss"] = out["loss"]
        out["mimic_loss"] = feature_mimic_loss(self.projection(visible), target)
        out["loss"] = self.recon_weight * out["recon_loss"] + self.mimic_weight * out["mimic_loss"]
        return out

    def _log_grid(self, tag: str, images: torch.Tensor, out: dict) -> None:
        rows = reconstruction_rows(images, out["pixel_mask"], out["reconstruction"])
        self.log_images(tag, rows, nrow=rows.shape[0] // 3)
