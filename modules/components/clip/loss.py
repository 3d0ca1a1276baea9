"""CLIP at scale (pure torch): the loss objects (softmax CLIP, sigmoid SigLIP), open_clip's ``local_loss`` and
gradient accumulation with feature caching.

``local_clip_loss``: each rank scores only its own rows against every rank's features, so the logits are
(B, world * B) per rank instead of (world * B)^2. The features are gathered *with* gradients (open_clip's
``gather_with_grad=True``): a rank's features are negatives in the other ranks' losses, and those terms
reach it through the backward of the gather; DDP's gradient average then gives exactly the gradient of the
full-batch loss.

``accumulated_contrastive_backward``: open_clip's ``accum_freq``. A no-grad pass caches every micro-batch's
features; then each micro-batch is re-encoded with gradients and the loss of the *whole* accumulated batch
is taken with the other micro-batches' cached features as constants, and back-propagated. The sum of those
k backwards is the gradient of one batch of k * b, while only one micro-batch's activations are alive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modules.components.parts import Part
from modules.components.contrastive import LogitScale, clip_loss, gather_features


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.

    The backward is an all-reduce of the (world * B, D) gradient, not a reduce-scatter: gloo has no
    reduce-scatter, and the features are tiny next to the gradient all-reduce of the towers.
    (``torch.distributed.nn.functional.all_gather`` does this too but is deprecated in torch 2.14.)
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rows = group, local.shape[0]
        ctx.rank = dist.get_rank(group)
        shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, local.contiguous(), group=group)
        return torch.cat(shards)  # (world * B, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def local_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, group=None
) -> torch.Tensor:
    """CLIP loss of this rank's (B, D) rows against every rank's features (open_clip ``local_loss=True``).

    The value is the loss of the local rows only; its mean over ranks (what DDP's gradient average
    differentiates) is the full-batch loss when every rank has the same B. Outside an initialised group
    with several ranks this is ``clip_loss``.
    """
    if not _distributed(group):
        return clip_loss(image_features, text_features, logit_scale)
    all_images = _AllGatherWithGrad.apply(image_features, group)  # (world * B, D)
    all_texts = _AllGatherWithGrad.apply(text_features, group)
    rows = image_features.shape[0]
    targets = torch.arange(rows, device=image_features.device) + dist.get_rank(group) * rows
    logits_per_image = logit_scale * image_features @ all_texts.t()  # (B, world * B)
    logits_per_text = logit_scale * text_features @ all_images.t()
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def distributed_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = False
) -> torch.Tensor:
    """The CLIP loss of the global batch under DDP: ``local_clip_loss`` or the full loss on every rank."""
    if local_loss:
        return local_clip_loss(image_features, text_features, logit_scale)
    image_all, text_all = gather_features(image_features, text_features)
    return clip_loss(image_all, text_all, logit_scale)


def accumulated_contrastive_backward(
    encode: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    num_micro_batches: int,
    logit_scale: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
    loss_fn: Callable[..., torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Gradient accumulation with feature caching (open_clip ``accum_freq``); returns the (detached) loss.

    Args:
        encode: ``encode(j)`` -> (image, text) features of micro-batch j, each (b, D); it must give the
            same values every call (fix any token mask per micro-batch before).
        num_micro_batches: k.
        logit_scale: returns the live logit scale, or a tuple of the loss's learnable inputs (SigLIP: scale
            and bias; ``ContrastiveLoss.inputs``).
        loss_fn: ``(images, texts, *inputs) -> loss`` of the accumulated (k * b, D) batch (e.g.
            ``distributed_clip_loss``, ``ContrastiveLoss.compute``).
        backward: how to back-propagate (Lightning's ``manual_backward``).

    Each of the k backwards carries the logit scale (and every other input) with 1/k of its gradient (value unchanged), so the
    scale gets the full-batch gradient once, not k times as in open_clip, and every parameter still takes
    part in every backward (DDP expects that).
    """
    with torch.no_grad():
        cached = [encode(j) for j in range(num_micro_batches)]
    cached_images = [images for images, _ in cached]
    cached_texts = [texts for _, texts in cached]
    total = None
    for j in range(num_micro_batches):
        images, texts = encode(j)
        all_images = torch.cat(cached_images[:j] + [images] + cached_images[j + 1:])  # (k * b, D)
        all_texts = torch.cat(cached_texts[:j] + [texts] + cached_texts[j + 1:])
        inputs = logit_scale()
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        inputs = [value.detach() + (value - value.detach()) / num_micro_batches for value in inputs]
        loss = loss_fn(all_images, all_texts, *inputs)
        backward(loss)
        total = loss.detach() if total is None else total
    return total


def split_micro_batches(tensors: Sequence[torch.Tensor], num_micro_batches: int) -> list[list[torch.Tensor]]:
    """Split each (k * b, ...) tensor into k micro-batches of b rows, in order."""
    rows = tensors[0].shape[0]
    if rows % num_micro_batches:
        raise ValueError(f"a batch of {rows} does not split into {num_micro_batches} equal micro-batches")
    return [list(parts) for parts in zip(*(t.chunk(num_micro_batches) for t in tensors))]


# --- loss objects, chosen by class_path ------------------------------------------------------------
class ContrastiveLoss(nn.Module, Part):
    """An image-text loss that owns its learnable inputs (the temperature; SigLIP's bias too).

    ``inputs()`` returns the live learnable tensors, ``compute(images, texts, *inputs)`` the training loss of the
    global batch under DDP (what ``accumulated_contrastive_backward`` calls with cached features), ``batch_loss``
    the loss of one local batch (validation), ``clamp_()`` keeps the temperature in range after a step.
    """

    logit_scale: LogitScale

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.logit_scale(),)

    def compute(self, image_features: torch.Tensor, text_features: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.compute(image_features, text_features, *self.inputs())

    def clamp_(self) -> None:
        self.logit_scale.clamp_()


class ClipLoss(ContrastiveLoss):
    """CLIP's softmax loss (Radford et al., 2021): symmetric cross-entropy over the batch, learnable temperature.

    Args:
        init_logit_scale: initial inverse temperature (CLIP: 1/0.07).
        max_logit_scale: the inverse temperature never exceeds this (CLIP: 100).
        local_loss: under DDP, each rank scores only its own rows against the gathered features (open_clip):
            (B, world*B) logits instead of (world*B)^2, the same gradients.
    """

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0, local_loss: bool = False):
        super().__init__()
        self.init_logit_scale, self.max_logit_scale, self.local_loss = init_logit_scale, max_logit_scale, local_loss
        self.logit_scale = LogitScale(init_logit_scale, max_logit_scale)

    def compute(self, image_features: torch.Tensor, text_features: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        (scale,) = inputs
        return distributed_clip_loss(image_features, text_features, scale, local_loss=self.local_loss)

    def batch_loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return clip_loss(image_features, text_features, self.logit_scale())


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, positive_offset: int = 0) -> torch.Tensor:
    """SigLIP's loss of (B, D) images against (M, D) texts: ``-sum log sigmoid(z_ij * (t x_i.y_j + b)) / B``.

    ``z_ij = 1`` for the pairs ``(i, positive_offset + i)``, -1 for every other pair. With ``M = B`` and offset 0
    this is the paper's per-batch loss (open_clip ``SigLipLoss`` on one process).
    """
    logits = logit_scale * image_features @ text_features.t() + logit_bias  # (B, M)
    rows = torch.arange(image_features.shape[0], device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


class SigLipLoss(ContrastiveLoss):
    """Sigmoid loss for language-image pre-training (SigLIP, Zhai et al., 2023): each pair a binary decision.

    The temperature ``t = exp(t')`` and the bias ``b`` are learnt, initialised as the paper's ``t' = log 10``,
    ``b = -10`` (the bias makes the many negatives' start-up loss small). Under DDP each rank scores its own
    images against every rank's text features (gathered with gradients), so a rank holds (B, world*B) logits and
    never the global (world*B)^2 matrix; its loss is open_clip's per-rank value and the mean over ranks, which
    DDP's gradient average differentiates, is the full-batch loss.

    Args:
        init_logit_scale: initial ``t`` (SigLIP: 10).
        init_logit_bias: initial ``b`` (SigLIP: -10).
        max_logit_scale: ``t`` never exceeds this (as open_clip clamps every model's scale at 100).
    """

    def __init__(self, init_logit_scale: float = 10.0, init_logit_bias: float = -10.0, max_logit_scale: float = 100.0):
        super().__init__()
        self.init_logit_scale, self.init_logit_bias, self.max_logit_scale = init_logit_scale, init_logit_bias, max_logit_scale
        self.logit_scale = LogitScale(init_logit_scale, max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.logit_scale(), self.logit_bias

    def compute(self, image_features: torch.Tensor, text_features: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        scale, bias = inputs
        if not _distributed():
            return sigmoid_loss(image_features, text_features, scale, bias)
        all_texts = _AllGatherWithGrad.apply(text_features, None)  # (world * B, D)
        offset = dist.get_rank() * image_features.shape[0]
        return sigmoid_loss(image_features, all_texts, scale, bias, positive_offset=offset)

    def batch_loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return sigmoid_loss(image_features, text_features, *self.inputs())
