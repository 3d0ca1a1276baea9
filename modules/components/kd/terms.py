"""Extra loss terms of ``DistillationModule`` (pure torch + timm), each chosen by ``class_path`` in YAML.

The module's loss is ``kd_weight * T^2 KL(targets || student) + sum(term.weight * term(step))`` over its
``terms``:

* ``HardLabels``: the loss on the ground-truth (or mixed) labels: cross-entropy, or an injected criterion
  (``timm.loss.BinaryCrossEntropy``) as the classifier takes.
* ``FeatureKD``: MSE between projected student features and the first teacher's layer-normed features
  (ScaleKD-style cross-attention projector, or a linear one for CNN teachers).
* ``LogitDiscriminator``: MEAL V2's output discriminator as in the paper's code (szq0214/MEAL-V2): the
  student's logits and the teachers' mean logits through a small 1x1-conv stack, minimised jointly with
  the student (no gradient reversal).
* ``ProbabilityDiscriminator``: an MLP on probability vectors with gradient reversal into the student
  (adversarial, GAN-style; visionlab's former discriminator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.contrastive import scale_gradient
from modules.components.kd.distill import (CrossAttention, PerTokenLinear, Projection, feature_kd_loss,
                                        student_tokens_and_logits, teacher_tokens)
from modules.components.errors import ConfigError
from modules.components.kd.targets import KDPart, KDTargets
from modules.components.parts import record


@dataclass
class KDStep:
    """What a loss term sees of one training step.

    Attributes:
        batch: the named batch (``image``, ``label``, ...).
        logits: (B, C) student logits.
        targets: the (calibrated) soft targets.
        temperature: the KD temperature.
        teachers: the target source's frozen teachers (empty with stored logits).
        tokens: (B, N_s, D_s) student feature tokens when a term asked for them (``feature_layer``).
    """

    batch: dict
    logits: torch.Tensor
    targets: KDTargets
    temperature: float
    teachers: Sequence[nn.Module]
    tokens: torch.Tensor | None = None


class LossTerm(KDPart):
    """One weighted extra loss. ``needs_tokens`` terms get the student's features at ``feature_layer``.

    Args:
        weight: factor of this term in the loss.
    """

    name = "term"
    needs_tokens = False
    feature_layer: int | None = None

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def bind(self, host) -> None:
        """Builds what depends on the networks (projectors, discriminators) from ``host.backbone`` (the student),
        ``host.teachers``, ``host.num_classes`` and ``host.image_size``."""

    def forward(self, step: KDStep) -> torch.Tensor:
        raise NotImplementedError


class HardLabels(LossTerm):
    """The student's loss on the ground-truth labels (MEAL V2 uses none: weight 0 or leave it out).

    The loss is the injected ``criterion`` the classifier takes too (``ClassificationModule.criterion``), called
    as ``criterion(logits, label)`` on the batch's labels: (B,) class indices, or (B, C) probabilities where a
    mixing step made the labels soft (mixup/CutMix). E.g. ``timm.loss.BinaryCrossEntropy`` (DeiT III, ResNet
    strikes back; its ``smoothing`` applies to index labels) or ``timm.loss.SoftTargetCrossEntropy``, by
    ``class_path``, as timm's ``LogitDistillationTask`` applies its task criterion to the (mixed) targets.
    Without a criterion: cross-entropy with ``label_smoothing`` (for index or soft labels).

    Args:
        weight: factor in the loss.
        label_smoothing: label smoothing of the default cross-entropy (a criterion carries its own).
        criterion: the loss on (logits, labels); ``None``: cross-entropy.
    """

    name = "hard_loss"

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0, criterion: nn.Module | None = None):
        super().__init__(weight)
        if criterion is not None and label_smoothing:
            raise ConfigError(f"HardLabels: label_smoothing {label_smoothing} and a criterion "
                              f"({type(criterion).__name__}): set the smoothing on the criterion")
        record(criterion)  # refuses a criterion a checkpoint cannot rebuild (a tensor pos_weight) now, not at save
        self.label_smoothing, self.criterion = label_smoothing, criterion

    def forward(self, step: KDStep) -> torch.Tensor:
        labels = step.batch["label"]  # (B,) indices or (B, C) mixed probabilities
        if self.criterion is not None:
            return self.criterion(step.logits, labels)
        return F.cross_entropy(step.logits, labels, label_smoothing=self.label_smoothing)


class FeatureKD(LossTerm):
    """Feature distillation from the first online teacher (ScaleKD spirit).

    Args:
        weight: factor in the loss.
        feature_layer: ``None`` for the final feature map, or an index into ``forward_intermediates`` (the
            same index for student and teacher).
        projector: the student -> teacher token map, by ``class_path``:
            ``modules.components.kd.distill.CrossAttention`` (ScaleKD: one learnable query per teacher token) or
            ``PerTokenLinear`` (per-token linear map + resampling onto the teacher's grid); ``None``:
            cross-attention for token teachers (ViT), per-token linear for CNN teachers.
    """

    name = "feat_loss"
    needs_tokens = True

    def __init__(self, weight: float = 1.0, feature_layer: int | None = None, projector: Projection | None = None):
        super().__init__(weight)
        self.feature_layer, self.projection = feature_layer, projector

    @torch.no_grad()
    def bind(self, host) -> None:
        student, teachers, image_size = host.backbone, host.teachers, host.image_size
        if not len(teachers):
            raise ConfigError("FeatureKD needs an online teacher: use OnlineTeachers (stored logits carry no features)")
        probe = torch.zeros(2, 3, image_size, image_size)
        was_training = student.training
        student.eval()
        tokens = student_tokens_and_logits(student, probe, self.feature_layer)[0]  # (B, N_s, D_s)
        student.train(was_training)
        target = teacher_tokens(teachers[0], probe, self.feature_layer)  # (B, N_t, D_t)
        projection = self.projection
        if projection is None:
            projection = CrossAttention() if teachers[0].forward_features(probe).ndim == 3 else PerTokenLinear()
        self.projector = projection.build(tokens.shape[1], tokens.shape[-1], target.shape[1], target.shape[-1])

    def forward(self, step: KDStep) -> torch.Tensor:
        target = teacher_tokens(step.teachers[0], step.batch["image"], self.feature_layer)
        return feature_kd_loss(self.projector(step.tokens), target)


def _teacher_logits(targets: KDTargets, temperature: float) -> torch.Tensor:
    """The teachers' mean logits, or (stored targets) ``T * log p``: logits of the same tempered distribution."""
    if targets.logits is not None:
        return targets.logits
    return temperature * targets.probs.clamp_min(1e-12).log()


class LogitDiscriminator(LossTerm):
    """MEAL V2's discriminator as in the paper's code (Shen & Savvides 2020, szq0214/MEAL-V2).

    Student logits and the teachers' mean logits are stacked on the batch axis and go through 1x1 convs
    ``C -> C/r -> C/r^2 -> 2``, each followed by a ReLU (the last one too, as in the reference); the output
    is scored by binary cross-entropy against ``[1, 0]`` for the student and ``[0, 1]`` for the teachers.
    The loss is simply added to the KD loss and minimised by one optimizer over student and discriminator:
    the student's gradient is not reversed. The reference uses r = 8 at 1000 classes and a learning rate of
    1e-4 for the discriminator; here the module's optimizer serves both, and widths are at least 2.

    Args:
        weight: factor in the loss (the reference: 1).
        reduction: r, the width divisor between the convs.
    """

    name = "disc_loss"

    def __init__(self, weight: float = 1.0, reduction: int = 8):
        super().__init__(weight)
        self.reduction = reduction

    def bind(self, host) -> None:
        num_classes = host.num_classes
        hidden = max(num_classes // self.reduction, 2)
        narrow = max(hidden // self.reduction, 2)
        self.net = nn.Sequential(nn.Conv2d(num_classes, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, narrow, 1), nn.ReLU(),
                                 nn.Conv2d(narrow, 2, 1), nn.ReLU())

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([student_logits.float(), teacher_logits.detach().float()])  # (2B, C)
        scores = self.net(inputs[:, :, None, None]).flatten(1)  # (2B, 2)
        batch = len(student_logits)
        truth = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=scores.device).repeat_interleave(batch, dim=0)  # (2B, 2)
        return F.binary_cross_entropy_with_logits(scores, truth)

    def forward(self, step: KDStep) -> torch.Tensor:
        return self.loss(step.logits, _teacher_logits(step.targets, step.temperature))


class ProbabilityDiscriminator(LossTerm):
    """An MLP telling teacher (1) from student (0) probability vectors, with gradient reversal into the student.

    The adversarial (GAN-style) reading of MEAL V2's discriminator, and visionlab's former one: the
    discriminator minimises the BCE while the reversed gradient makes the student maximise it. MEAL V2's
    code does neither (``LogitDiscriminator``).

    Args:
        weight: factor in the loss.
        hidden_dim: width of the two hidden layers.
    """

    name = "disc_loss"

    def __init__(self, weight: float = 1.0, hidden_dim: int = 128):
        super().__init__(weight)
        self.hidden_dim = hidden_dim

    def bind(self, host) -> None:
        self.net = nn.Sequential(nn.Linear(host.num_classes, self.hidden_dim), nn.ReLU(),
                                 nn.Linear(self.hidden_dim, self.hidden_dim), nn.ReLU(), nn.Linear(self.hidden_dim, 1))

    def loss(self, student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        student_probs = scale_gradient(student_probs, -1.0)
        logits = self.net(torch.cat([teacher_probs.detach(), student_probs])).squeeze(-1)  # (2B,)
        truth = torch.cat([torch.ones(len(teacher_probs)), torch.zeros(len(student_probs))]).to(logits)
        return F.binary_cross_entropy_with_logits(logits, truth)

    def forward(self, step: KDStep) -> torch.Tensor:
        return self.loss(step.logits.float().softmax(-1), step.targets.probs)
