"""Optimizer and learning-rate schedule wiring shared by all techniques (timm under the hood)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim import Optimizer

from modules.components.errors import ConfigError

# Parameter leaf names that get no weight decay under the ``tokens`` rule: class/register/distillation tokens,
# mask tokens and (learned) position embeddings, wherever they sit in the module tree.
TOKEN_NAMES = frozenset({"cls_token", "reg_token", "dist_token", "mask_token", "pos_embed"})

# Which trainable parameters get no weight decay, by the reference each rule follows (``OptimConfig.weight_decay_rule``).
WEIGHT_DECAY_RULES = {
    # MAE pretraining (main_pretrain.py: timm's add_weight_decay with an empty skip list): biases and <= 1-d
    # parameters (norms) only; class and mask tokens (and learned position embeddings) are decayed.
    "bias_norm": "biases and <= 1-d parameters",
    # MAE fine-tuning (main_finetune.py: param_groups_lrd(no_weight_decay_list=model.no_weight_decay())), SimMIM
    # (optimizer.py: model.no_weight_decay() and no_weight_decay_keywords()) and timm's own factory: biases,
    # <= 1-d parameters and what each module lists in ``no_weight_decay()`` (timm ViT: pos_embed, cls/reg/dist
    # tokens; SimMIM's ViT lists no mask token, so it is decayed; its Swin lists it).
    "bias_norm_listed": "biases, <= 1-d parameters and each module's no_weight_decay() list",
    # open_clip (training/main.py: exclude p.ndim < 2, bn/ln, bias, logit_scale): here "fewer than 2 dims" does not
    # count leading singleton dims, so timm's (1, 1, D) class token is exempt like open_clip's (D,)
    # class_embedding, and position embeddings ((1, N, D) here, (N, D) there) are decayed.
    "open_clip": "biases, norms, logit_scale and parameters with < 2 non-leading-singleton dims",
    # DiT (train.py: AdamW(model.parameters(), weight_decay=0)): one group, every parameter at weight_decay.
    "all": "nothing exempt",
    # visionlab's earlier global rule: bias_norm_listed plus any token or position embedding (TOKEN_NAMES) by name.
    "tokens": "bias_norm_listed plus every cls/reg/dist/mask token and pos_embed",
}
DEFAULT_WEIGHT_DECAY_RULE = "tokens"  # techniques that name no reference rule of their own
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)  # open_clip's "bn" / "ln" parameters


@dataclass
class OptimConfig:
    """Optimizer + warmup-cosine schedule settings, shared by every technique's YAML (`optim:`).

    Args:
        name: any timm optimizer name (``sgd``, ``adamw``, ``lion``, ``lamb``, ``lars``, ...).
        lr: peak learning rate (reached after warmup). With ``lr_base_batch`` set it is the *base* lr.
        weight_decay: decoupled weight decay; which parameters get none is ``weight_decay_rule``.
        weight_decay_rule: a key of ``WEIGHT_DECAY_RULES``; ``None`` (default) takes the technique's reference
            rule (MAE pretraining ``bias_norm``, SimMIM and fine-tuning ``bias_norm_listed``, CLIP ``open_clip``,
            diffusion ``all``; others ``tokens``); ``tokens`` is visionlab's earlier rule everywhere.
        momentum: momentum of every optimizer that takes one (SGD variants, LARS, RMSprop, ...).
        betas: Adam-style betas; ``None`` keeps the optimizer's own default (AdamW: (0.9, 0.999); MAE
            uses (0.9, 0.95)). Ignored by optimizers without betas.
        eps: Adam-style epsilon; ``None`` keeps the optimizer's default. Ignored where not taken.
        lr_base_batch: if set, the peak lr is ``lr * global_batch / lr_base_batch`` with global batch =
            per-device batch x devices x nodes x gradient accumulation (the MAE/DeiT linear scaling rule;
            MAE uses 256, SimMIM 512), so a recipe does not change with the allocation. ``None``: ``lr``
            is absolute.
        layer_decay: layer-wise lr decay for fine-tuning (a timm model; see :func:`layer_ids`).
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        min_lr_ratio: final lr as a fraction of the peak lr.
        warmup_lr_ratio: initial warmup lr as a fraction of the peak lr.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    weight_decay_rule: str | None = None
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


def listed_no_weight_decay(model: nn.Module) -> set[str]:
    """Full parameter names (relative to ``model``) that some submodule lists in its ``no_weight_decay()``.

    timm's factory only asks the root, which here is often a LightningModule wrapping the backbone, so every
    submodule's list is collected, prefixed with the submodule's path (SimMIM's wrapper does the same by hand).
    """
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def no_weight_decay_names(model: nn.Module, rule: str = DEFAULT_WEIGHT_DECAY_RULE) -> set[str]:
    """Full names of the trainable parameters of ``model`` that get no weight decay under ``rule``."""
    if rule not in WEIGHT_DECAY_RULES:
        raise ConfigError(f"optim.weight_decay_rule must be one of {sorted(WEIGHT_DECAY_RULES)}, not {rule!r}")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if rule == "all":
        return set()
    bias_or_1d = {name for name, p in params if p.ndim <= 1 or name.endswith(".bias")}
    if rule == "bias_norm":
        return bias_or_1d
    if rule == "open_clip":
        norms = {f"{prefix}.{leaf}" if prefix else leaf for prefix, module in model.named_modules()
                 if isinstance(module, NORM_TYPES) for leaf, _ in module.named_parameters(recurse=False)}
        return {name for name, p in params
                if _non_singleton_ndim(p.shape) < 2 or "bias" in name or name in norms or "logit_scale" in name}
    listed = bias_or_1d | {name for name, _ in params if _listed(name, listed_no_weight_decay(model))}
    if rule == "bias_norm_listed":
        return listed
    return listed | {name for name, _ in params if name.rsplit(".", 1)[-1] in TOKEN_NAMES}


def _non_singleton_ndim(shape) -> int:
    """Dimensions after dropping leading size-1 ones: (1, 1, D) -> 1, (1, N, D) -> 2."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def _listed(name: str, patterns: set[str]) -> bool:
    """``name`` is listed: exactly or by a wildcard pattern, as timm's own grouping matches (``fnmatch``)."""
    return name in patterns or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Layer index of each parameter for layer-wise lr decay: 0 = embeddings, then blocks, last = the head.

    From timm's ``group_matcher`` (``group_parameters``), as timm's ``param_groups_layer_decay``, with one
    change: a final ``norm`` that the matcher merges into the last block (timm's ViT, Swin, ... list
    ``(r'^norm', (99999,))``) joins the head's layer instead, as MAE's ``util/lr_decay.py``
    (``get_layer_id_for_vit``: everything outside the embeddings and blocks is layer ``num_layers``, lr scale
    1.0) and SimMIM's ``get_vit_layer`` / ``get_swin_layer`` do. Other timm families keep timm's grouping:
    stem/embeddings first, one layer per block (or stage, as the family's matcher says), parameters that
    match no rule (heads, ``fc_norm``, ConvNeXt's ``head.norm``) in one last layer. Models without a matcher:
    every parameter in layer 0 (no decay across layers).
    """
    names = [name for name, _ in model.named_parameters()]
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        return {name: 0 for name in names}
    rules = dict(matcher(coarse=False))
    blocks = rules.get("blocks")
    if isinstance(blocks, (list, tuple)):
        rules["blocks"] = [rule for rule in blocks if not (isinstance(rule, tuple) and rule[0] == r"^norm")]
    return group_parameters(model, rules, reverse=True)


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                     rule: str = DEFAULT_WEIGHT_DECAY_RULE) -> list[dict]:
    """The one parameter-group helper: weight decay except on ``no_weight_decay_names(model, rule)``.

    Frozen parameters are left out. With ``layer_decay`` every group also carries an ``lr_scale`` of
    ``layer_decay ** (last layer - layer)`` (:func:`layer_ids`; the last layer, the head, gets 1.0).
    """
    no_decay = no_weight_decay_names(model, rule)
    layers = layer_ids(model) if layer_decay is not None else {}
    last = max(layers.values(), default=0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decays = layers.get(name, last), bool(weight_decay) and name not in no_decay
        group = groups.setdefault((layer, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0})
        if layer_decay is not None:
            group["lr_scale"] = layer_decay ** (last - layer)
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None,
                    default_rule: str | None = None) -> Optimizer:
    """timm's optimizer factory on `parameter_groups`; ``lr`` overrides ``cfg.lr`` (e.g. a scaled lr).

    The weight-decay rule is ``cfg.weight_decay_rule``, else ``default_rule`` (the technique's reference rule),
    else ``DEFAULT_WEIGHT_DECAY_RULE``.
    """
    rule = cfg.weight_decay_rule or default_rule or DEFAULT_WEIGHT_DECAY_RULE
    extra = {key: value for key, value in (("betas", cfg.betas), ("eps", cfg.eps)) if value is not None}
    if "betas" in extra:
        extra["betas"] = tuple(extra["betas"])
    return create_optimizer_v2(
        parameter_groups(model, cfg.weight_decay, cfg.layer_decay, rule),
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
