"""The feature network of the Frechet distance: a classifier checkpoint this project trained itself.

This is not Inception-FID (no downloadable Inception weights here): the distance lives in the pre-logit
space of a visionlab ``ClassificationModule`` checkpoint, and the same network scores sample class accuracy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from modules.components.checkpoints import load_checkpoint
from modules.components.errors import ConfigError
from modules.components.transfer import build_from_checkpoint


class FeatureClassifier(nn.Module):
    """A classifier taking images in [-1, 1]: ``forward`` gives pre-logit features, ``logits`` the classes.

    ``num_features`` lets torchmetrics' ``FrechetInceptionDistance(feature=...)`` use it directly; the owner
    holds that metric in a ``Frozen`` wrapper (eval mode, no gradients, not checkpointed).

    Args:
        backbone: the timm classifier.
        mean: per-channel mean of the classifier's input normalisation (on [0, 1] images).
        std: per-channel std of that normalisation.
    """

    def __init__(self, backbone: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.backbone = backbone
        self.num_features = backbone.num_features
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        images = ((images.float().clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        return self.backbone.forward_features(images)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self._feature_map(images), pre_logits=True)  # (B, num_features)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self._feature_map(images))  # (B, classes)


def load_feature_classifier(path: str | Path) -> FeatureClassifier:
    """Rebuild a ``ClassificationModule`` checkpoint's backbone (and its data normalisation) without importing it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"feature classifier {path} does not exist: train one with configs/classification/*.yaml "
                          "on the same data and pass its .ckpt as model.feature_classifier (or set it to null)")
    ckpt = load_checkpoint(path, "feature classifier")
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "backbone" not in hparams or not isinstance(hparams["backbone"], str):
        raise ConfigError(f"feature classifier {path} is not a ClassificationModule checkpoint (no 'backbone' "
                          "hyperparameter): pass a .ckpt written by visionlab fit with configs/classification/*.yaml")
    backbone, _ = build_from_checkpoint(path, head="keep", what="feature classifier", ckpt=ckpt)
    data = ckpt.get("datamodule_hyper_parameters") or {}
    if "mean" not in data:
        warnings.warn(f"feature classifier {path} records no data normalisation: assuming mean=std=0.5", stacklevel=2)
    return FeatureClassifier(backbone, data.get("mean", (0.5,) * 3), data.get("std", (0.5,) * 3))
