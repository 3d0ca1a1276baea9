"""Optimizer and learning-rate schedule wiring shared by all techniques (timm under the hood)."""

from __future__ import annotations

from dataclasses import dataclass

from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim import Optimizer

# Parameter leaf names that never get weight decay: class/register/distillation tokens, mask tokens and
# (learned) position embeddings, wherever they sit in the module tree (the SimMIM and MAE references
# exclude them; timm ViTs list them in ``no_weight_decay()``).
TOKEN_NAMES = frozenset({"cls_token", "reg_token", "dist_token", "mask_token", "pos_embed"})


@dataclass
class OptimConfig:
    """Optimizer + warmup-cosine schedule settings, shared by every technique's YAML (`optim:`).

    Args:
        name: any timm optimizer name (``sgd``, ``adamw``, ``lion``, ``lamb``, ``lars``, ...).
        lr: peak learning rate (reached after warmup). With ``lr_base_batch`` set it is the *base* lr.
        weight_decay: decoupled weight decay; biases, norms, tokens and position embeddings get none.
        momentum: momentum of every optimizer that takes one (SGD variants, LARS, RMSprop, ...).
        betas: Adam-style betas; ``None`` keeps the optimizer's own default (AdamW: (0.9, 0.999); MAE
            uses (0.9, 0.95)). Ignored by optimizers without betas.
        eps: Adam-style epsilon; ``None`` keeps the optimizer's default. Ignored where not taken.
        lr_base_batch: if set, the peak lr is ``lr * global_batch / lr_base_batch`` with global batch =
            per-device batch x devices x nodes x gradient accumulation (the MAE/DeiT linear scaling rule;
            MAE uses 256, SimMIM 512), so a recipe does not change with the allocation. ``None``: ``lr``
            is absolute.
        layer_decay: layer-wise lr decay for fine-tuning (needs a timm model with ``group_matcher``).
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        min_lr_ratio: final lr as a fraction of the peak lr.
        warmup_lr_ratio: initial warmup lr as a fraction of the peak lr.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: tuple[float, float] | None = None
    eps: float | None = None
    lr_base_batch: int | None = None
    layer_decay: float | None = None
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    warmup_lr_ratio: float = 0.01


def global_batch_size(per_device_batch: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """Samples per optimizer step: per-device batch x (devices x nodes) x gradient accumulation."""
    return int(per_device_batch) * int(world_size) * int(accumulate_grad_batches)


def peak_lr(cfg: OptimConfig, global_batch: int | None = None) -> float:
    """``cfg.lr``, or ``cfg.lr * global_batch / cfg.lr_base_batch`` when the scaling rule is on."""
    if cfg.lr_base_batch is None:
        return cfg.lr
    if global_batch is None:
        raise ValueError("optim.lr_base_batch is set but the global batch size is unknown")
    return cfg.lr * global_batch / cfg.lr_base_batch


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names (relative to ``model``) that get no weight decay, besides biases and norms.

    Collects every submodule's own ``no_weight_decay()`` list (timm models, the MAE decoder), prefixed
    with the submodule's path -- timm's factory only asks the root, which here is often a LightningModule
    wrapping the backbone -- plus every parameter whose leaf name is in ``TOKEN_NAMES``.
    """
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    names |= {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in TOKEN_NAMES}
    return names


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """The one parameter-group helper: no decay on biases, norms (all <= 1-d), tokens, position embeddings.

    Frozen parameters are left out. With ``layer_decay`` the groups also carry timm's ``lr_scale``.
    """
    no_decay = no_weight_decay_names(model)
    if layer_decay is not None:
        return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                        no_weight_decay_list=no_decay)
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None) -> Optimizer:
    """timm's optimizer factory on `parameter_groups`; ``lr`` overrides ``cfg.lr`` (e.g. a scaled lr)."""
    extra = {key: value for key, value in (("betas", cfg.betas), ("eps", cfg.eps)) if value is not None}
    if "betas" in extra:
        extra["betas"] = tuple(extra["betas"])
    return create_optimizer_v2(
        parameter_groups(model, cfg.weight_decay, cfg.layer_decay),
        opt=cfg.name,
        lr=cfg.lr if lr is None else lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,  # timm passes it on to every optimizer that has momentum, drops it elsewhere
        **extra,
    )


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int,
                    lr: float | None = None) -> CosineLRScheduler:
    """Per-step warmup + cosine decay (timm); call ``step_update(global_step)`` after each step.

    ``lr`` is the peak lr the optimizer was built with (default ``cfg.lr``); the warmup start and the
    final lr are fractions of it.
    """
    lr = cfg.lr if lr is None else lr
    total_steps = max(int(total_steps), 1)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup if warmup > 0 else total_steps,
        lr_min=lr * cfg.min_lr_ratio,
        warmup_t=warmup,
        warmup_lr_init=lr * cfg.warmup_lr_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )
