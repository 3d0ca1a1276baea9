"""Supervised image classification over any timm backbone (the default visionlab technique)."""

from __future__ import annotations

import torch
from torch import nn

from modules.base import SupervisedModule
from modules.components.backbones import create_backbone
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig
from modules.components.transfer import build_from_checkpoint


class ClassificationModule(SupervisedModule):
    """Supervised classifier: timm backbone, label smoothing, Mixup/CutMix, optional kornia batch augmentation.

    Args:
        backbone: timm model name, e.g. ``resnet18``, ``vit_tiny_patch16_224``, ``convnext_atto``; with
            ``init_checkpoint`` it may be left out (null): the architecture is the one the checkpoint records.
        num_classes: classes (linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments (``depth``, ``patch_size``...); with
            ``init_checkpoint``, merged over the recorded ones (e.g. ``global_pool``).
        drop_path_rate: stochastic depth rate.
        label_smoothing: label smoothing for the hard-label loss (and Mixup targets).
        mixup_alpha: Mixup alpha; 0 disables.
        cutmix_alpha: CutMix alpha; 0 disables.
        init_checkpoint: a visionlab checkpoint (or plain state dict, with ``backbone`` named) whose backbone
            weights initialise this model (`transfer.build_from_checkpoint`): a classifier of another class
            count is re-initialised, position embeddings are resampled to ``image_size``.
        optim: optimizer and schedule.
        criterion: the training loss, called as ``criterion(logits, target)`` with integer labels, or with
            mixup/cutmix's soft targets when those are on — e.g. ``timm.loss.BinaryCrossEntropy`` (DeiT III,
            ResNet strikes back). ``None`` (default): cross-entropy with ``label_smoothing`` (soft-target
            cross-entropy under mixup, whose targets carry the smoothing). Validation always reports
            cross-entropy.
    """

    weight_decay_rule = "bias_norm_listed"  # MAE main_finetune.py / DeiT: 1-d and the model's no_weight_decay()

    def __init__(
        self,
        backbone: str | None = None,
        num_classes: int = 1000,
        image_size: int = 224,
        backbone_kwargs: dict | None = None,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        init_checkpoint: str | None = None,
        optim: OptimConfig | None = None,
        criterion: nn.Module | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.save_hyperparameters(ignore=["criterion"])
        self.criterion = criterion
        kwargs = dict(backbone_kwargs or {})
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if init_checkpoint:
            self.backbone, arch = build_from_checkpoint(init_checkpoint, "replace", num_classes, image_size, backbone, kwargs)
            self.hparams.update(backbone=arch.name, backbone_kwargs=arch.kwargs)  # what later readers rebuild
        elif backbone is None:
            raise ConfigError("model.backbone is null: name a timm model, or set model.init_checkpoint to start from")
        else:
            self.backbone = create_backbone(backbone, num_classes=num_classes, image_size=image_size, **kwargs)
        self.use_mixup(mixup_alpha, cutmix_alpha, label_smoothing)
        self.label_smoothing = label_smoothing

    def optimizer_root(self) -> nn.Module:
        return self.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, num_classes)

    def training_step(self, batch, batch_idx):
        return self.supervised_step(batch, self.label_smoothing, self.criterion)
