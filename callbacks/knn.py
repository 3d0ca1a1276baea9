"""Weighted kNN accuracy on frozen features during self-supervised pretraining (Wu et al., 2018; solo-learn).

At the end of each validation epoch the monitor embeds the training split (eval transforms, no augmentation)
and the validation split with the module's current weights, L2-normalises the features, and classifies each
validation image by its ``k`` most cosine-similar training images, each voting for its class with weight
``exp(similarity / temperature)``, as solo-learn's ``WeightedKNNClassifier`` (k=20, T=0.07). Logged as
``val/knn_acc1`` (and ``val/knn_acc5`` with more than 5 classes).

Interface: ``pl_module.embed(images) -> (B, D)`` when the module has it, else the pooled pre-logits features
of its timm ``pl_module.backbone`` (``forward_head(forward_features(x), pre_logits=True)``); the DataModule's
``eval_dataloader(split)`` (both visionlab back-ends have it). Under DDP each rank embeds its shard and the
features are gathered.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F


def weighted_knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                         num_classes: int, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores (Q, C) of queries ``features`` (Q, D) from a memory bank (N, D) with labels (N,)."""
    similarity = F.normalize(features, dim=1) @ F.normalize(train_features, dim=1).T  # (Q, N)
    top, index = similarity.topk(min(k, train_features.shape[0]), dim=1)  # (Q, k)
    votes = torch.zeros(features.shape[0], num_classes, device=features.device, dtype=features.dtype)
    return votes.scatter_add_(1, train_labels[index], (top / temperature).exp())


def _embed(pl_module, images: torch.Tensor) -> torch.Tensor:
    if hasattr(pl_module, "embed"):
        return pl_module.embed(images)
    backbone = pl_module.backbone
    return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


class KNNMonitor(pl.Callback):
    """Logs weighted-kNN top-1 (``val/knn_acc1``) of the module's frozen features each validation epoch.

    Args:
        k: neighbours (solo-learn: 20).
        temperature: vote temperature (solo-learn: 0.07).
        every_n_epochs: run every this many validation epochs.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, every_n_epochs: int = 1):
        super().__init__()
        self.k, self.temperature, self.every_n_epochs = k, temperature, every_n_epochs

    @torch.no_grad()
    def _features(self, trainer, pl_module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        datamodule = trainer.datamodule
        features, labels = [], []
        for batch in datamodule.eval_dataloader(split):
            images, target = batch["image"].to(pl_module.device), batch["label"].to(pl_module.device)
            images = datamodule.normalize(images) if images.dtype == torch.uint8 else images
            features.append(_embed(pl_module, images).float().flatten(1))
            labels.append(target.long().view(-1))
        features, labels = torch.cat(features), torch.cat(labels)
        if trainer.world_size > 1:
            features, labels = pl_module.all_gather(features).flatten(0, 1), pl_module.all_gather(labels).flatten()
        return features, labels

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            bank, bank_labels = self._features(trainer, pl_module, "train")
            queries, labels = self._features(trainer, pl_module, "val")
        finally:
            pl_module.train(was_training)
        num_classes = trainer.datamodule.num_classes
        scores = weighted_knn_predict(bank, bank_labels, queries, num_classes, self.k, self.temperature)
        ranked = scores.argsort(dim=1, descending=True)
        pl_module.log("val/knn_acc1", (ranked[:, 0] == labels).float().mean(), rank_zero_only=True)
        if num_classes > 5:
            pl_module.log("val/knn_acc5", (ranked[:, :5] == labels[:, None]).any(1).float().mean(), rank_zero_only=True)
