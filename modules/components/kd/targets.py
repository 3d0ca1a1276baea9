"""Where a distilled student's soft targets come from, and how they are calibrated (pure torch + timm).

``DistillationModule`` takes one *target source* and an optional *calibration*, each chosen by
``class_path`` in YAML:

* ``OnlineTeachers``: frozen teachers run on the student's crops; the target is the mean of their tempered
  softmaxes (MEAL V2, Shen & Savvides 2020).
* ``WeightedTeachers``: the same teachers, their tempered softmaxes averaged with given weights (uniform weights:
  MEAL V2's mean, as ``OnlineTeachers``).
* ``StoredLogits``: the teacher's top-k probabilities stored by ``visionlab store-logits`` and replayed with
  their crops (``datamodules.replay.StoredCrops``), the other classes filled with the teacher's true remainder
  ``(1 - sum(top-k)) / (C - k)`` (FKD, Shen & Xing 2022; TinyViT, Wu et al. 2022). No teacher runs.
* ``StoredLogitsRenormalised``: the same files renormalised over the top-k (FKD's ``marginal_renorm``).
* ``FerKD`` calibration (Zhiqiang Shen, FerKD, ICCV 2023): per-crop soft/hard label adaptation by the
  teacher's confidence on the true class.

Every part records its constructor arguments (``modules.components.parts``) so that a checkpoint holds only primitive
hyper-parameters (``class_path`` + ``init_args``) and is rebuilt from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from modules.components.kd.distill import (build_teacher, check_ferkd_thresholds, ensemble_soft_targets, ferkd_calibrate,
                                        renormalised_sparse_targets, sparse_soft_targets, teacher_mean,
                                        topk_probabilities)
from modules.components.errors import ConfigError
from modules.components.frozen import Frozen
from modules.components.parts import Part

STORED_KEYS = ("topk_values", "topk_indices", "topk_logsumexp", "logits_temperature")


@dataclass
class KDTargets:
    """Soft targets of one batch.

    Attributes:
        probs: (B, C) target distribution at the KD temperature.
        logits: (B, C) the teachers' (weighted) mean logits when teachers ran (the MEAL V2 discriminator's input), else
            ``None``.
        weights: (B,) per-crop loss weights (FerKD), or ``None`` for all ones.
        logs: scalars to log under ``train/`` (e.g. FerKD's share of hard negatives).
    """

    probs: torch.Tensor
    logits: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class KDPart(nn.Module, Part):
    """A part injected into ``DistillationModule``; its constructor arguments are its record (``parts.Part``)."""


# --- target sources --------------------------------------------------------------------------------
class TargetSource(KDPart):
    """Produces ``KDTargets`` for a named batch. ``teachers`` are the frozen networks it runs (maybe none):
    held in a ``Frozen`` wrapper, so they stay in eval mode and out of the student's checkpoint."""

    def __init__(self):
        super().__init__()
        self.frozen = Frozen(nn.ModuleList())

    @property
    def teachers(self) -> nn.ModuleList:
        return self.frozen.module

    def bind(self, host) -> None:
        """Reads ``host.num_classes`` (and ``image_size``, for teachers built here)."""
        self.num_classes = host.num_classes

    def forward(self, batch: dict, temperature: float) -> KDTargets:
        raise NotImplementedError


class OnlineTeachers(TargetSource):
    """Frozen teachers run on every batch; target = mean of their tempered softmaxes (MEAL V2).

    Args:
        teachers: each a visionlab classifier checkpoint path, a timm name (random init: tests only) or an
            ``nn.Module`` producing (B, num_classes) logits.
        teacher_kwargs: extra ``timm.create_model`` arguments for teachers given by name.
    """

    teacher_weights: list[float] | None = None  # uniform (MEAL V2); WeightedTeachers sets its own

    def __init__(self, teachers: list[str | nn.Module] | None = None, teacher_kwargs: dict | None = None):
        super().__init__()
        self.specs, self.teacher_kwargs = list(teachers or []), teacher_kwargs

    @torch.no_grad()
    def bind(self, host) -> None:
        super().bind(host)
        num_classes, image_size = host.num_classes, host.image_size
        self.frozen = Frozen(nn.ModuleList(build_teacher(t, num_classes, image_size, self.teacher_kwargs) for t in self.specs))
        probe = torch.zeros(2, 3, image_size, image_size)
        for i, teacher in enumerate(self.teachers):
            classes = teacher(probe).shape[-1]
            if classes != num_classes:
                raise ConfigError(f"teacher {i} outputs {classes} classes but the data has {num_classes}: "
                                  "use teachers trained on the same classes")

    def teacher_logits(self, batch: dict) -> list[torch.Tensor]:
        """Each teacher's float32 logits on ``batch["image"]``, (B, C) each."""
        if not self.teachers:
            raise ConfigError("no teachers: pass targets.init_args.teachers, or use "
                              "modules.components.kd.targets.StoredLogits with data.init_args.batches: "
                              "datamodules.replay.StoredCrops")
        return [teacher(batch["image"]).float() for teacher in self.teachers]

    @torch.no_grad()
    def forward(self, batch: dict, temperature: float) -> KDTargets:
        logits = self.teacher_logits(batch)
        weights = self.teacher_weights
        return KDTargets(ensemble_soft_targets(logits, temperature, weights), teacher_mean(torch.stack(logits), weights))


class WeightedTeachers(OnlineTeachers):
    """Frozen teachers run on every batch; target = weighted mean of their tempered softmaxes.

    ``probs = sum_i w_i softmax(z_i / T)`` and ``logits = sum_i w_i z_i`` (the discriminator's input), with the
    weights normalised to sum 1. Uniform weights are MEAL V2's ensemble (Shen & Savvides 2020): its reference
    (szq0214/MEAL-V2, ``extensions/teacher_wrapper.py``) averages the teachers' softmaxes and, for the
    discriminator, their logits with equal weight, at temperature 1; visionlab tempers by ``T`` and lets a
    stronger teacher count more. ``weights=None`` is exactly ``OnlineTeachers``' computation.

    Args:
        teachers: as ``OnlineTeachers``.
        teacher_kwargs: as ``OnlineTeachers``.
        weights: one non-negative weight per teacher, in the order of ``teachers`` (any scale: they are
            normalised); ``None``: uniform.
    """

    def __init__(self, teachers: list[str | nn.Module] | None = None, teacher_kwargs: dict | None = None,
                 weights: list[float] | None = None):
        super().__init__(teachers, teacher_kwargs)
        if weights is not None and (any(w < 0 for w in weights) or not sum(weights) > 0):
            raise ConfigError(f"targets.init_args.weights {list(weights)} must be non-negative with a positive sum "
                              "(one per teacher), or null for uniform")
        self.teacher_weights = None if weights is None else [float(w) / sum(weights) for w in weights]

    def bind(self, host) -> None:
        super().bind(host)
        if self.teacher_weights is not None and len(self.teacher_weights) != len(self.teachers):
            raise ConfigError(f"targets.init_args.weights: {len(self.teacher_weights)} weights for {len(self.teachers)} "
                              "teachers; give one per teacher, in order, or null for uniform")



class StoredLogits(TargetSource):
    """Replayed top-k teacher probabilities with the true remainder on the other classes (FKD / TinyViT).

    Reads ``topk_values``, ``topk_indices``, ``topk_logsumexp`` and ``logits_temperature`` from the batch
    (``datamodules.replay.StoredCrops`` batches); the student's KD temperature must equal the storing temperature (the
    remainder exists only at the temperature it was stored at). No teacher runs.
    """

    def __init__(self):
        super().__init__()

    def _stored(self, batch: dict) -> None:
        missing = [key for key in STORED_KEYS if key not in batch]
        if missing:
            raise ConfigError(f"the training batch has no stored logits ({', '.join(missing)} missing): use "
                              "data.init_args.batches: datamodules.replay.StoredCrops with its logits_path, or "
                              "OnlineTeachers")

    def forward(self, batch: dict, temperature: float) -> KDTargets:
        self._stored(batch)
        stored_temperature = float(batch["logits_temperature"])
        if abs(stored_temperature - temperature) > 1e-6 * max(1.0, temperature):
            raise ConfigError(f"the logits were stored at temperature {stored_temperature} but model.temperature is "
                              f"{temperature}: set them equal, store again with --temperature {temperature}, or use "
                              "StoredLogitsRenormalised (re-tempers the top-k, drops the remainder)")
        probs = topk_probabilities(batch["topk_values"], batch["topk_logsumexp"], stored_temperature)  # (B, k)
        return KDTargets(sparse_soft_targets(probs, batch["topk_indices"], self.num_classes))


class StoredLogitsRenormalised(StoredLogits):
    """Replayed top-k logits renormalised over the top-k (FKD's ``marginal_renorm``; visionlab's former default).

    Drops the teacher's tail mass (``renormalised_sparse_targets``), but re-tempers the stored logits at any
    KD temperature; ``rest_mass`` gives a constant share, spread evenly, to the unstored classes.

    Args:
        rest_mass: probability given to the classes outside the stored top-k, in [0, 1).
    """

    def __init__(self, rest_mass: float = 0.0):
        super().__init__()
        if not 0.0 <= rest_mass < 1.0:
            raise ConfigError(f"rest_mass {rest_mass} must be in [0, 1)")
        self.rest_mass = rest_mass

    def forward(self, batch: dict, temperature: float) -> KDTargets:
        self._stored(batch)
        return KDTargets(renormalised_sparse_targets(batch["topk_values"], batch["topk_indices"], self.num_classes,
                                                     temperature, self.rest_mass))


# --- calibration -----------------------------------------------------------------------------------
class FerKD(KDPart):
    """FerKD's soft-hard label adaptation (Zhiqiang Shen, FerKD, ICCV 2023), ``distill.ferkd_calibrate``.

    Args:
        low: below this teacher confidence on the true class a crop is a hard negative (softened hard label).
        high: at or above it a crop is an easy positive.
        smoothing: label smoothing of the softened hard labels given to hard negatives.
        negative_weight: loss weight of hard negatives.
        easy_weight: loss weight of easy positives.
    """

    def __init__(self, low: float = 0.2, high: float = 0.9, smoothing: float = 0.3, negative_weight: float = 1.0,
                 easy_weight: float = 1.0):
        super().__init__()
        check_ferkd_thresholds(low, high)
        self.low, self.high, self.smoothing = low, high, smoothing
        self.negative_weight, self.easy_weight = negative_weight, easy_weight

    def forward(self, targets: KDTargets, labels: torch.Tensor) -> KDTargets:
        confidence = targets.probs.gather(1, labels.long()[:, None]).squeeze(1)  # (B,) teacher p(true class)
        probs, weights = ferkd_calibrate(targets.probs, labels, self.low, self.high, self.smoothing,
                                         self.negative_weight, self.easy_weight)
        if targets.weights is not None:
            weights = weights * targets.weights
        logs = {**targets.logs, "ferkd_negatives": (confidence < self.low).float().mean()}
        return replace(targets, probs=probs, weights=weights, logs=logs)
