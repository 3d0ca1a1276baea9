"""Batches by name: what every technique reads instead of positions (pure Python; no Lightning).

A batch is a dict with at least ``image`` (B, 3, H, W) and ``label`` (B,); loaders that know the sample's
position add ``index`` (B,), captioning adds ``tokens`` (B, L) and ``caption_id`` (B,), replayed stored logits
add ``topk_values``, ``topk_indices``, ``topk_logsumexp`` and ``logits_temperature``. Every visionlab
DataModule yields such dicts (``datamodules.base.ImageDataModule.on_after_batch_transfer``).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def named_batch(batch) -> dict:
    """``batch`` as a dict: dicts pass through, a lone tensor is an ``image`` batch (predict on raw images).

    Raises:
        TypeError: for anything else, e.g. a positional ``[images, labels]`` list (name its items instead).
    """
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, torch.Tensor):
        return {"image": batch}
    raise TypeError(f"a batch is a dict of named tensors (image, label, ...) or an image tensor, not a "
                    f"{type(batch).__name__}: positional batches are not read (e.g. {{'image': x, 'label': y}})")


class NamedTensors(TensorDataset):
    """``TensorDataset(images, labels)`` whose items are ``{"image": ..., "label": ...}``: its loaders yield named
    batches as the DataModules do (in-memory data for tests and benchmarks); ``tensors`` stays ``(images, labels)``."""

    def __getitem__(self, index):
        images, labels = self.tensors
        return {"image": images[index], "label": labels[index]}
