"""Optimizer and learning-rate schedule wiring shared by all techniques (timm under the hood)."""

from __future__ import annotations

from dataclasses import dataclass

from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim import Optimizer


@dataclass
class OptimConfig:
    """Optimizer + warmup-cosine schedule settings, shared by every technique's YAML (`optim:`).

    Args:
        name: any timm optimizer name (``sgd``, ``adamw``, ``lion``, ``lamb``, ...).
        lr: peak learning rate (reached after warmup).
        weight_decay: decoupled weight decay; biases, norms and tokens get none.
        momentum: momentum for SGD-style optimizers.
        layer_decay: layer-wise lr decay for fine-tuning (needs a timm model with ``group_matcher``).
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        min_lr_ratio: final lr as a fraction of ``lr``.
        warmup_lr_ratio: initial warmup lr as a fraction of ``lr``.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: float | None = None
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    warmup_lr_ratio: float = 0.01


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """timm's optimizer factory with its weight-decay parameter groups (the one param-group helper)."""
    kwargs = {"momentum": cfg.momentum} if cfg.name.lower() in {"sgd", "nesterov", "momentum"} else {}
    return create_optimizer_v2(
        model,
        opt=cfg.name,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        filter_bias_and_bn=True,
        **kwargs,
    )


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> CosineLRScheduler:
    """Per-step warmup + cosine decay (timm); call ``step_update(global_step)`` after each step."""
    total_steps = max(int(total_steps), 1)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup if warmup > 0 else total_steps,
        lr_min=cfg.lr * cfg.min_lr_ratio,
        warmup_t=warmup,
        warmup_lr_init=cfg.lr * cfg.warmup_lr_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )
