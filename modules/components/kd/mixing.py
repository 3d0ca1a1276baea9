"""Mixing crops and their soft targets by the same weights (FKD's mixup/CutMix; FerKD's SelfMix). Pure torch.

``DistillationModule`` takes an optional *mixing* part, applied after the targets (and their calibration)
and before the student's forward:

* ``SoftTargetMix``: FKD's ``mixup_cutmix`` on (replayed) crops: with probability ``prob`` one mixup
  (probability ``mixup_share``) or CutMix per batch, every crop paired with a random other crop of the
  batch; the soft targets (and FerKD's weights) are mixed by the same lambda, CutMix's corrected to the
  pasted box's exact pixel share.
* ``SelfMix``: FerKD's stable mixing (Zhiqiang Shen, FerKD, ICCV 2023): the partner of each crop is another
  crop *of the same image* (``crops_per_image >= 2`` in ``datamodules.replay``), so the mixed image and
  its mixed soft label stay close to the image's own, which the paper finds stabilises soft supervision.
  FerKD publishes no SelfMix code (its README defers to FKD's); this follows the paper's description,
  with CutMix as the mixing operation.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from timm.data.mixup import cutmix_bbox_and_lam

from modules.components.errors import ConfigError
from modules.components.kd.targets import KDPart, KDTargets


def mix_targets(targets: KDTargets, partners: torch.Tensor, lam: float) -> KDTargets:
    """``lam * own + (1 - lam) * partner`` for the soft targets, the teachers' logits and the loss weights."""
    def mixed(tensor):
        return None if tensor is None else lam * tensor + (1.0 - lam) * tensor[partners]
    return replace(targets, probs=mixed(targets.probs), logits=mixed(targets.logits), weights=mixed(targets.weights))


def mix_labels(labels: torch.Tensor, partners: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """The ground-truth labels mixed like their crops: (B,) indices or (B, C) probabilities -> (B, C)."""
    soft = labels.float() if labels.ndim == 2 else F.one_hot(labels.long(), num_classes).float()
    return lam * soft + (1.0 - lam) * soft[partners]


def kept_share(box: tuple[int, int, int, int], shape: torch.Size) -> float:
    """CutMix's lambda: the share of pixels of (..., H, W) ``shape`` outside ``box`` (top, bottom, left, right)."""
    top, bottom, left, right = box
    return 1.0 - (bottom - top) * (right - left) / (shape[-2] * shape[-1])


def mixup(images: torch.Tensor, targets: KDTargets, partners: torch.Tensor, lam: float) -> tuple[torch.Tensor, KDTargets]:
    """Mixup of each crop with ``images[partners]`` (B, 3, H, W): pixels and targets by the same ``lam``."""
    return lam * images + (1.0 - lam) * images[partners], mix_targets(targets, partners, lam)


def cutmix(images: torch.Tensor, targets: KDTargets, partners: torch.Tensor,
           box: tuple[int, int, int, int]) -> tuple[torch.Tensor, KDTargets]:
    """Paste ``images[partners]`` inside ``box`` (top, bottom, left, right); targets mixed by the kept pixel share."""
    top, bottom, left, right = box
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images[partners, :, top:bottom, left:right]
    return mixed, mix_targets(targets, partners, kept_share(box, images.shape))


def same_image_partners(index: torch.Tensor) -> torch.Tensor:
    """For each crop, the position of the next crop of the same image (cyclically), (B,) -> (B,).

    Raises:
        ConfigError: some image has a single crop in the batch.
    """
    order = torch.argsort(index, stable=True)
    ranks = torch.arange(len(index), device=index.device)
    starts_group = torch.ones_like(index, dtype=torch.bool)
    starts_group[1:] = index[order][1:] != index[order][:-1]
    group = starts_group.cumsum(0) - 1  # group id of each sorted position
    first = torch.cummax(torch.where(starts_group, ranks, torch.zeros_like(ranks)), 0).values
    size = torch.bincount(group)[group]
    if int(size.min()) < 2:
        raise ConfigError("SelfMix mixes crops of the same image: set data.init_args.batches.init_args.crops_per_image >= 2 "
                          "(datamodules.replay) so that each image comes several times per batch")
    partner_sorted = first + (ranks - first + 1) % size
    partners = torch.empty_like(order)
    partners[order] = order[partner_sorted]
    return partners


class Mixing(KDPart):
    """Mixes a batch of crops, their targets and their ground-truth labels by the same weights; ``partners``
    picks each crop's partner. The mixed batch's ``label`` is (B, C) probabilities, what ``HardLabels`` (and
    its criterion, e.g. timm's ``BinaryCrossEntropy``) then scores, as timm's mixup does for a classifier.
    """

    def partners(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict, targets: KDTargets) -> tuple[dict, KDTargets]:
        raise NotImplementedError

    @staticmethod
    def _mixed_batch(batch: dict, images: torch.Tensor, targets: KDTargets, partners: torch.Tensor, lam: float) -> dict:
        mixed = {**batch, "image": images}
        if "label" in batch:
            mixed["label"] = mix_labels(batch["label"], partners, lam, targets.probs.shape[-1])
        return mixed

    def _cutmix(self, batch: dict, targets: KDTargets, alpha: float) -> tuple[dict, KDTargets]:
        images = batch["image"]
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        (top, bottom, left, right), _ = cutmix_bbox_and_lam(images.shape, lam, correct_lam=True)
        box, partners = (int(top), int(bottom), int(left), int(right)), self.partners(batch)
        mixed, mixed_targets = cutmix(images, targets, partners, box)
        return self._mixed_batch(batch, mixed, targets, partners, kept_share(box, images.shape)), mixed_targets


class SoftTargetMix(Mixing):
    """FKD's mixup/CutMix on crops with their soft targets, partners drawn at random over the batch.

    Args:
        mixup_alpha: Beta(alpha, alpha) of mixup's lambda (FKD: 0.8).
        cutmix_alpha: Beta(alpha, alpha) of CutMix's lambda (FKD: 1.0).
        prob: probability of mixing a batch at all (FKD's ``mixup_cutmix_prob``: 1.0).
        mixup_share: probability that a mixed batch uses mixup rather than CutMix (FKD's ``mixup_switch_prob``).
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0, mixup_share: float = 0.5):
        super().__init__()
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.mixup_share = mixup_alpha, cutmix_alpha, prob, mixup_share

    def partners(self, batch: dict) -> torch.Tensor:
        return torch.randperm(len(batch["image"])).to(batch["image"].device)

    def forward(self, batch: dict, targets: KDTargets) -> tuple[dict, KDTargets]:
        if float(torch.rand(())) >= self.prob:
            return batch, targets
        if float(torch.rand(())) < self.mixup_share:
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            partners = self.partners(batch)
            mixed, mixed_targets = mixup(batch["image"], targets, partners, lam)
            return self._mixed_batch(batch, mixed, targets, partners, lam), mixed_targets
        return self._cutmix(batch, targets, self.cutmix_alpha)


class SelfMix(Mixing):
    """FerKD's SelfMix: CutMix between crops of the same image (``batch["index"]`` names the image).

    Args:
        alpha: Beta(alpha, alpha) of the kept share lambda.
    """

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def partners(self, batch: dict) -> torch.Tensor:
        if "index" not in batch:
            raise ConfigError("SelfMix needs the image index of each crop: use data.init_args.batches: datamodules.replay.StoredCrops with crops_per_image >= 2")
        return same_image_partners(batch["index"])

    def forward(self, batch: dict, targets: KDTargets) -> tuple[dict, KDTargets]:
        return self._cutmix(batch, targets, self.alpha)
