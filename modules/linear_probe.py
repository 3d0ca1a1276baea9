"""Linear probing of a frozen pretrained encoder (the MAE paper's protocol: BatchNorm without affine + linear)."""

from __future__ import annotations

import torch
from torch import nn

from modules.base import SupervisedModule
from modules.components.errors import ConfigError
from modules.components.frozen import Frozen
from modules.components.mim.encoders import frozen_encoder
from modules.components.optim import OptimConfig


class LinearProbeModule(SupervisedModule):
    """A frozen encoder from a pretraining checkpoint, ``BatchNorm1d(affine=False)`` and a linear classifier.

    Only the linear layer trains; the encoder is `Frozen` (eval mode, no gradients, saved in the probe's
    checkpoint under ``backbone.*``). Its architecture is the one the checkpoint records; the checkpoint's
    ``backbone.*`` weights must match it exactly, classifier aside (the mismatching names are listed otherwise).

    Args:
        backbone: timm name of the encoder; default (null): the one the checkpoint records.
        num_classes: classes (linked from the data).
        image_size: input size (linked from the data).
        init_checkpoint: the pretraining checkpoint (``.ckpt`` of ``visionlab fit``).
        backbone_kwargs: ``timm.create_model`` arguments merged over the recorded ones (e.g. ``global_pool``).
        pool: ``token`` = the model's own pooling (class token for ViTs), ``avg`` = mean of patch tokens.
        optim: optimizer and schedule (of the linear layer).
        label_smoothing: label smoothing of the training loss (MAE's linear probe: none).
        mixup_alpha: Mixup alpha; 0 (MAE's probe) disables.
        cutmix_alpha: CutMix alpha; 0 (MAE's probe) disables.
    """

    def __init__(
        self,
        backbone: str | None = None,
        num_classes: int = 1000,
        image_size: int = 224,
        init_checkpoint: str | None = None,
        backbone_kwargs: dict | None = None,
        pool: str = "token",
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.save_hyperparameters()
        if pool not in {"token", "avg"}:
            raise ConfigError(f"model.pool '{pool}' is not one of token, avg")
        if not init_checkpoint:
            raise ConfigError("a linear probe needs model.init_checkpoint: the .ckpt of a pretraining run")
        self.backbone = Frozen(frozen_encoder(backbone, image_size, init_checkpoint, backbone_kwargs), in_checkpoint=True)
        self.pool = pool
        dim = self.backbone.module.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.label_smoothing = label_smoothing
        self.use_mixup(mixup_alpha, cutmix_alpha, label_smoothing)

    def optimizer_root(self) -> nn.Module:
        return self.head

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self.backbone.module
        tokens = encoder.forward_features(images)
        if self.pool == "avg" and tokens.ndim == 3:
            return tokens[:, getattr(encoder, "num_prefix_tokens", 0):].mean(dim=1)  # (B, D)
        return encoder.forward_head(tokens, pre_logits=True)  # (B, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)

    def training_step(self, batch, batch_idx):
        return self.supervised_step(batch, self.label_smoothing)
