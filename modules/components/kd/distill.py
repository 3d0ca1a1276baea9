"""Knowledge-distillation pieces (pure torch + timm): soft targets, KD loss, FerKD calibration, projectors.

Papers: MEAL V2 (Shen & Savvides 2020) ensemble soft targets; FKD / TinyViT (Shen & Xing 2022; Wu et al.
2022) stored sparse top-k teacher probabilities with the true remainder; FerKD (Zhiqiang Shen, ICCV 2023)
per-crop calibration by teacher confidence; ScaleKD (Fan et al. 2024) cross-attention feature projector.
The parts ``DistillationModule`` is built from live in ``kd_targets`` (target sources, calibration) and
``kd_terms`` (extra loss terms).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.backbones import create_backbone
from modules.components.errors import ConfigError
from modules.components.parts import Part
from modules.components.tokens import feature_mimic_loss, resize_tokens
from modules.components.transfer import build_from_checkpoint

# Feature KD loss: MSE between projected student tokens and layer-normalised teacher tokens (B, N_t, D_t).
feature_kd_loss = feature_mimic_loss


# --- soft targets ----------------------------------------------------------------------------------
def teacher_mean(stacked: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """The mean over the first (teacher) axis of ``stacked`` (num_teachers, ...), or its ``weights``-weighted sum
    (one weight per teacher, summing to 1)."""
    if weights is None:
        return stacked.mean(dim=0)
    w = torch.tensor(weights, device=stacked.device, dtype=stacked.dtype).view(-1, *[1] * (stacked.ndim - 1))
    return (stacked * w).sum(dim=0)


def ensemble_soft_targets(teacher_logits: list[torch.Tensor], temperature: float = 1.0,
                          weights: list[float] | None = None) -> torch.Tensor:
    """MEAL V2 target: the mean over teachers of ``softmax(logits / T)``, (B, C) each -> (B, C); with ``weights``
    (one per teacher, summing to 1) their weighted mean instead."""
    if not teacher_logits:
        raise ConfigError("ensemble_soft_targets needs at least one teacher's logits")
    stacked = torch.stack([logits.float() for logits in teacher_logits])  # (num_teachers, B, C)
    return teacher_mean((stacked / temperature).softmax(dim=-1), weights)


def topk_probabilities(topk_values: torch.Tensor, topk_logsumexp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's tempered probabilities of its stored top-k classes: ``exp(z_i / T - logsumexp(z / T))``.

    Args:
        topk_values: (B, k) stored teacher logits ``z_i`` (any float dtype).
        topk_logsumexp: (B,) stored ``logsumexp(z / T)`` over all C classes (``sparse_logits`` format 2).
        temperature: T, the storing temperature.
    """
    return (topk_values.float() / temperature - topk_logsumexp.float()[:, None]).exp()  # (B, k)


def sparse_soft_targets(topk_probs: torch.Tensor, topk_indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense (B, C) targets from the teacher's top-k probabilities with the true remainder (FKD / TinyViT).

    The k stored classes keep the teacher's probabilities; each of the C - k other classes gets
    ``(1 - sum(top-k)) / (C - k)``, the teacher's own tail mass spread evenly (FKD's
    ``marginal_smoothing_k*`` labels, TinyViT's sparse-logit rebuild). The total mass is the teacher's,
    and the total-variation distance to the teacher's full softmax is only the tail's unevenness.

    Args:
        topk_probs: (B, k) teacher probabilities of the stored classes (``topk_probabilities``).
        topk_indices: (B, k) int64 class indices.
        num_classes: C.
    """
    probs = topk_probs.float()
    k = probs.shape[-1]
    rest = (1.0 - probs.sum(dim=-1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)  # (B, 1)
    targets = rest.expand(-1, num_classes).clone() if k < num_classes else torch.zeros(len(probs), num_classes, device=probs.device)
    return targets.scatter_(1, topk_indices.long(), probs)  # (B, C)


def renormalised_sparse_targets(topk_values: torch.Tensor, topk_indices: torch.Tensor, num_classes: int,
                                temperature: float = 1.0, rest_mass: float = 0.0) -> torch.Tensor:
    """Dense (B, C) targets renormalised over the stored top-k logits (FKD's ``marginal_renorm`` variant).

    The k stored logits get ``softmax(values / T)`` over the k classes alone, so the teacher's tail mass
    ``1 - sum(top-k)`` is dropped and moved onto the top-k (at k = 5 of 10 Fashion-MNIST classes about 20%
    of the mass, a total-variation distance of that size from the teacher). It needs no log-normaliser and
    re-tempers the stored logits at any T. ``rest_mass > 0`` instead gives a *constant* fraction of the mass,
    spread evenly, to the C - k unstored classes: a label-smoothing-like fill the same for every crop,
    which does not restore the teacher's own remainder (``sparse_soft_targets`` does).

    Args:
        topk_values: (B, k) teacher logits (any float dtype).
        topk_indices: (B, k) int64 class indices.
        num_classes: C.
        temperature: softmax temperature applied to the stored logits.
        rest_mass: probability given to the unstored classes, in [0, 1).
    """
    if not 0.0 <= rest_mass < 1.0:
        raise ConfigError(f"sparse rest_mass {rest_mass} must be in [0, 1)")
    k = topk_values.shape[-1]
    probs = (topk_values.float() / temperature).softmax(dim=-1)  # (B, k)
    targets = torch.zeros(topk_values.shape[0], num_classes, device=topk_values.device)
    if rest_mass > 0 and k < num_classes:
        targets.fill_(rest_mass / (num_classes - k))
        probs = probs * (1.0 - rest_mass)
    return targets.scatter_(1, topk_indices.long(), probs)  # (B, C)


# --- losses ----------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float = 1.0,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(targets || softmax(student / T))`` averaged over the batch (Hinton et al. 2015).

    KL rather than soft cross-entropy so that the loss is 0 when the student's tempered distribution equals
    the targets; its gradient equals soft cross-entropy's. ``T^2`` keeps gradient magnitudes comparable
    across temperatures. ``weights`` (B,) scales each sample's term (FerKD); the mean is over all B.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    per_sample = (torch.xlogy(soft_targets, soft_targets) - soft_targets * log_student).sum(dim=-1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean() * temperature**2


def check_ferkd_thresholds(low: float, high: float) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"FerKD thresholds need 0 <= low <= high <= 1, got low={low}, high={high}")


def ferkd_calibrate(soft_targets: torch.Tensor, labels: torch.Tensor, low: float = 0.2, high: float = 0.9,
                    negative_smoothing: float = 0.3, negative_weight: float = 1.0,
                    easy_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FerKD: calibrate each crop's soft target by the teacher's confidence ``p = targets[gt]``.

    * ``p < low`` (hard negative: the crop shows mostly background or another object): the teacher's soft
      label is unreliable; it is replaced by a softened hard label, ``(1 - s) * onehot(gt) + s / C``, which
      keeps the crop as context instead of teaching noise; its loss weight is ``negative_weight``.
    * ``low <= p < high`` (hard positive): the teacher's soft label is kept (weight 1).
    * ``p >= high`` (easy positive): kept, weight ``easy_weight`` (< 1 down-weights crops that teach little).

    Returns:
        ``(targets (B, C), weights (B,))``.
    """
    check_ferkd_thresholds(low, high)
    num_classes = soft_targets.shape[-1]
    confidence = soft_targets.gather(1, labels.long()[:, None]).squeeze(1)  # (B,)
    softened = F.one_hot(labels.long(), num_classes).float() * (1.0 - negative_smoothing) + negative_smoothing / num_classes
    negative = confidence < low
    targets = torch.where(negative[:, None], softened, soft_targets)
    weights = torch.ones_like(confidence)
    weights = torch.where(negative, torch.full_like(weights, negative_weight), weights)
    weights = torch.where(confidence >= high, torch.full_like(weights, easy_weight), weights)
    return targets, weights


# --- teachers --------------------------------------------------------------------------------------
def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter, eval mode; returns the module."""
    module.requires_grad_(False)
    return module.eval()


def build_teacher(spec: str | nn.Module, num_classes: int, image_size: int | None = None,
                  kwargs: dict | None = None) -> nn.Module:
    """A frozen teacher from a visionlab classifier checkpoint path, a timm name (random init) or a module.

    A checkpoint (a classifier's, or a distilled student's) is rebuilt from its ``hyper_parameters`` at its own
    resolution and loaded strictly, classifier included (`transfer.build_from_checkpoint`, ``head="keep"``).
    """
    if isinstance(spec, nn.Module):
        return freeze(spec)
    path = Path(spec).expanduser()
    if not (path.suffix in {".ckpt", ".pt", ".pth"} or path.exists()):
        return freeze(create_backbone(spec, num_classes=num_classes, image_size=image_size, **(kwargs or {})))
    return freeze(build_from_checkpoint(path, head="keep", num_classes=num_classes, what="teacher checkpoint")[0])


# --- features --------------------------------------------------------------------------------------
def feature_tokens(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A timm model's feature map as tokens ``(B, N, D)``: ViT prefix tokens dropped, NCHW/NHWC flattened."""
    if features.ndim == 3:
        return features[:, getattr(model, "num_prefix_tokens", 0):]
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        features = features.permute(0, 3, 1, 2)
    return features.flatten(2).transpose(1, 2)  # (B, H*W, C)


def student_tokens_and_logits(model: nn.Module, images: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feature tokens (B, N, D), logits (B, C))`` of a timm model in one forward pass; ``layer`` indexes
    ``forward_intermediates`` (``None``: the final feature map)."""
    if layer is None:
        features = model.forward_features(images)
        return feature_tokens(model, features), model.forward_head(features)
    final, (inter,) = model.forward_intermediates(images, indices=[layer])
    return feature_tokens(model, inter), model.forward_head(final)


@torch.no_grad()
def teacher_tokens(model: nn.Module, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """A frozen teacher's feature tokens ``(B, N_t, D_t)`` at ``layer`` (``None``: the final feature map)."""
    if layer is None:
        return feature_tokens(model, model.forward_features(images))
    (inter,) = model.forward_intermediates(images, indices=[layer], intermediates_only=True)
    return feature_tokens(model, inter)


def _square_grid(num_tokens: int) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(f"feature KD needs a square token grid, got {num_tokens} tokens")
    return side, side


class Projection(Part):
    """How ``FeatureKD`` maps student feature tokens onto the teacher's (chosen by ``class_path``).

    ``build`` is called once the token shapes are known (a probe forward of both networks) and returns the
    trainable projector ``(B, N_s, D_s) -> (B, N_t, D_t)``.
    """

    def build(self, student_tokens: int, student_dim: int, teacher_tokens: int, teacher_dim: int) -> nn.Module:
        raise NotImplementedError


class CrossAttention(Projection):
    """ScaleKD's projector (:class:`CrossAttentionProjector`): one learnable query per teacher token.

    Args:
        num_heads: attention heads (reduced to a divisor of the teacher width if needed).
    """

    def __init__(self, num_heads: int = 4):
        self.num_heads = num_heads

    def build(self, student_tokens: int, student_dim: int, teacher_tokens: int, teacher_dim: int) -> nn.Module:
        return CrossAttentionProjector(student_dim, teacher_dim, teacher_tokens, self.num_heads)


class PerTokenLinear(Projection):
    """A per-token linear map and bilinear resampling onto the teacher's grid (:class:`LinearProjector`), the
    token form of the 1x1-conv projector of CNN feature distillation."""

    def build(self, student_tokens: int, student_dim: int, teacher_tokens: int, teacher_dim: int) -> nn.Module:
        return LinearProjector(student_dim, teacher_dim, student_tokens, teacher_tokens)


class LinearProjector(nn.Module):
    """Per-token linear map to the teacher width, then bilinear resampling onto the teacher's token grid.

    The token form of a 1x1-conv projector for CNN features: ``(B, N_s, D_s) -> (B, N_t, D_t)``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, student_tokens: int, teacher_tokens: int):
        super().__init__()
        self.student_grid, self.teacher_grid = _square_grid(student_tokens), _square_grid(teacher_tokens)
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return resize_tokens(self.proj(tokens), self.student_grid, self.teacher_grid)  # (B, N_t, D_t)


class CrossAttentionProjector(nn.Module):
    """ScaleKD-style projector: one learnable query per teacher token cross-attends over the student tokens.

    Works for any student (CNN maps or ViT tokens, any grid) and aligns it to a ViT teacher's token
    sequence: ``(B, N_s, D_s) -> (B, N_t, D_t)``.

    Args:
        student_dim: D_s.
        teacher_dim: D_t (also the attention width).
        teacher_tokens: N_t, the number of queries.
        num_heads: attention heads (reduced to a divisor of ``teacher_dim`` if needed).
    """

    def __init__(self, student_dim: int, teacher_dim: int, teacher_tokens: int, num_heads: int = 4):
        super().__init__()
        heads = max(h for h in range(1, num_heads + 1) if teacher_dim % h == 0)
        self.queries = nn.Parameter(torch.randn(1, teacher_tokens, teacher_dim) * 0.02)
        self.key_value = nn.Sequential(nn.Linear(student_dim, teacher_dim), nn.LayerNorm(teacher_dim))
        self.attention = nn.MultiheadAttention(teacher_dim, heads, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(teacher_dim), nn.Linear(teacher_dim, teacher_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.key_value(tokens)  # (B, N_s, D_t)
        queries = self.queries.expand(tokens.shape[0], -1, -1)  # (B, N_t, D_t)
        attended, _ = self.attention(queries, memory, memory, need_weights=False)
        return self.out(attended + queries)  # (B, N_t, D_t)
