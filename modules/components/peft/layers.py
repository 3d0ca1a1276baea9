"""Parameter-efficient fine-tuning pieces (pure torch + timm, no Lightning).

* SSF (Scaling & Shifting Your Features, Lian et al. 2022): per-channel ``y = scale * op(x) + shift`` after
  linear/conv/norm ops, inserted by replacing named submodules with :class:`SSF`, and folded back into the
  wrapped op by :func:`merge_ssf` so the deployed model is the plain timm model (plus a bias where a
  bias-free linear/conv had none).
* Bottleneck adapters: AdaptFormer's parallel adapter beside a ViT block's MLP branch, fed the block's
  residual stream, or sequential (Houlsby/Pfeiffer) after an MLP or residual block; weights optionally
  low-bit (:mod:`modules.components.peft.low_bit`).
* A hierarchical side network (after Hierarchical Side-Tuning, Lin et al. 2023) fed by intermediate
  activations of the frozen backbone via timm's ``forward_intermediates``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import BatchNormAct2d, LayerNorm2d, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame, get_act_layer
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn

from modules.components.errors import ConfigError
from modules.components.peft.low_bit import QuantLinear, WeightQuantizer
from modules.components.peft.side_network import SideConfig  # noqa: F401  (re-exported: checkpoints._safe_types)


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``root`` (works for Sequential/ModuleList indices too)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _channel_shape(values: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape per-channel ``values`` (C,) to broadcast over ``like`` along ``channel_dim``."""
    if channel_dim == -1 or like.ndim <= 2:
        return values
    shape = [1] * like.ndim
    shape[channel_dim] = -1
    return values.view(shape)


# --------------------------------------------------------------------------------------------------
# SSF
# --------------------------------------------------------------------------------------------------
_WEIGHT_STANDARDISED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


def ssf_site(module: nn.Module) -> tuple[int, int] | None:
    """``(channels, channel_dim)`` when an SSF after ``module`` can be folded into its own weights.

    Foldable: every linear/conv (a bias-free one gets a bias at merge; weight-standardised convs are not
    foldable: their forward normalises a scaled weight back), affine LayerNorm/BatchNorm/GroupNorm, and
    timm's ``BatchNormAct2d``, whose SSF sits between the BN affine and the activation (see
    :func:`insert_ssf`).
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, _WEIGHT_STANDARDISED):
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        return channels, (-1 if isinstance(module, nn.Linear) else 1)
    if isinstance(module, nn.LayerNorm):
        if module.weight is None or module.bias is None or len(module.normalized_shape) != 1:
            return None
        return module.normalized_shape[0], (1 if isinstance(module, LayerNorm2d) else -1)
    if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        return ((module.num_features if isinstance(module, nn.BatchNorm2d) else module.num_channels), 1) if module.affine else None
    return None


class SSF(nn.Module):
    """``scale * inner(x) + shift`` per output channel (SSF); ``merge()`` returns ``inner`` with them folded in.

    Args:
        inner: the wrapped op (see :func:`ssf_site` for which ones fold).
        channels: output channels of ``inner``.
        channel_dim: channel axis of the output (-1 for tokens, 1 for NCHW maps).
        init_std: scale ~ N(1, std), shift ~ N(0, std) as in the paper; 0 gives the identity.
    """

    def __init__(self, inner: nn.Module, channels: int, channel_dim: int, init_std: float = 0.02):
        super().__init__()
        self.inner = inner
        self.channel_dim = channel_dim
        self.ssf_scale = nn.Parameter(torch.ones(channels))
        self.ssf_shift = nn.Parameter(torch.zeros(channels))
        if init_std > 0:
            nn.init.normal_(self.ssf_scale, mean=1.0, std=init_std)
            nn.init.normal_(self.ssf_shift, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y * _channel_shape(self.ssf_scale, y, self.channel_dim) + _channel_shape(self.ssf_shift, y, self.channel_dim)

    @torch.no_grad()
    def fold_into(self, affine: nn.Module) -> None:
        """W' = scale * W, b' = scale * b + shift on ``affine`` (a linear/conv or a norm's affine)."""
        scale, shift = self.ssf_scale.detach(), self.ssf_shift.detach()
        weight = affine.weight
        weight.mul_(scale.view(-1, *[1] * (weight.ndim - 1)) if isinstance(affine, (nn.Linear, nn.Conv2d)) else scale)
        if affine.bias is None:  # bias-free linear/conv: the shift becomes its new bias
            affine.bias = nn.Parameter(shift.to(weight).clone(), requires_grad=weight.requires_grad)
        else:
            affine.bias.mul_(scale).add_(shift)

    def merge(self) -> nn.Module:
        self.fold_into(self.inner)
        return self.inner


def _is_se(module: nn.Module) -> bool:
    name = type(module).__name__
    return "SqueezeExcite" in name or name.endswith("SEModule")


def _bias_free_ops_feeding_bn(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Names of bias-free linear/convs whose output tensor is the input of a BatchNorm (one traced forward).

    conv -> SSF -> BN -> SSF is the same per-channel affine family as conv -> BN -> SSF (frozen BNs run in
    eval mode), so such convs need no SSF of their own and keep the plain architecture at merge (ResNet,
    EfficientNet). Only BatchNorm is trusted this way: a CNN's conv output feeds nothing but its BN, where
    a linear before a LayerNorm may also feed a residual (Swin's patch merging).
    """
    produced, feeding, keep, handles = {}, set(), [], []

    def record_output(name: str):
        def hook(module, inputs, output) -> None:
            produced[id(output)] = name
            keep.append(output)  # alive until the trace ends, so ids are not reused
        return hook

    def record_input(module, inputs) -> None:
        feeding.add(produced.get(id(inputs[0])))

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is None:
            handles.append(module.register_forward_hook(record_output(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(record_input))
    probe_forward(model, example, handles)
    return feeding - {None}


def insert_ssf(model: nn.Module, exclude: tuple[str, ...] = (), init_std: float = 0.02,
               example: torch.Tensor | None = None) -> list[str]:
    """Wrap every foldable op of ``model`` (except names under ``exclude``) in :class:`SSF`; returns their names.

    A ``BatchNormAct2d`` gets its SSF in place of its (identity) ``drop`` module, i.e. after the BN affine and
    before the activation, and folds into the BN at merge. With an ``example`` input, bias-free ops that feed
    a BatchNorm are skipped (see :func:`_bias_free_ops_feeding_bn`); without one every linear/conv gets an SSF.

    Raises:
        ConfigError: SSF was inserted already, or the only sites are squeeze-excitation or head convs (the
            model's main path uses ops SSF cannot fold, e.g. weight-standardised convs).
    """
    if any(isinstance(m, SSF) for m in model.modules()):
        raise ConfigError("the model already has SSF layers: insert_ssf must run once")
    redundant = _bias_free_ops_feeding_bn(model, example) if example is not None else set()
    sites, in_se = [], set()
    for name, module in list(model.named_modules()):
        if _is_se(module):
            in_se.add(name)
        site = ssf_site(module)
        if not name or site is None or name in redundant or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if isinstance(module, BatchNormAct2d):
            sites.append((f"{name}.drop", module.drop, site))
        else:
            sites.append((name, module, site))
    main = [n for n, _, _ in sites if not n.endswith("conv_head") and not any(n.startswith(se + ".") for se in in_se)]
    if not main:
        raise ConfigError(
            f"SSF found no foldable op on the main path of {type(model).__name__}: its only sites are squeeze-excitation "
            f"or head convs ({', '.join(n for n, _, _ in sites[:4]) or 'none'})"
        )
    for name, module, site in sites:
        replace_submodule(model, name, SSF(module, *site, init_std=init_std))
    return [n for n, _, _ in sites]


def merge_ssf(model: nn.Module) -> nn.Module:
    """Fold every :class:`SSF` of ``model`` into the op it wraps, in place; the result has no SSF modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SSF):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if isinstance(parent, BatchNormAct2d) and parent.drop is module:
                module.fold_into(parent)
                parent.drop = module.inner
            else:
                replace_submodule(model, name, module.merge())
    return model


def probe_forward(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One eval-mode, no-grad forward of ``example`` for the recording hooks ``handles``, then removes them and
    restores the model's mode."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------
@dataclass
class AdapterConfig:
    """Bottleneck adapter settings (defaults: AdaptFormer's public code).

    Args:
        dim: bottleneck width.
        scale: multiplier of the adapter output (AdaptFormer's s; 0.1 in its code).
        bias: biases in the down/up projections (AdaptFormer: yes; the low-bit adapters' code: no).
        dropout: dropout after the activation (0.1 in both papers' code).
        activation: timm activation name (``relu`` in both papers' code).
        quantizer: low-bit weights (``None``: fp32).
    """

    dim: int = 8
    scale: float = 0.1
    bias: bool = True
    dropout: float = 0.1
    activation: str = "relu"
    quantizer: WeightQuantizer | None = None


class Adapter(nn.Module):
    """``scale * up(dropout(act(down(x))))`` over the channel axis.

    fp32: ``up`` starts at zero (the adapter starts as 0). Low-bit: ``up`` starts ~ trunc-normal(std 0.001)
    as in the low-bit adapters' code, since an all-zero weight has no spread to quantize.
    """

    def __init__(self, channels: int, cfg: AdapterConfig, channel_dim: int = -1):
        super().__init__()
        if cfg.quantizer is None:
            self.down, self.up = nn.Linear(channels, cfg.dim, bias=cfg.bias), nn.Linear(cfg.dim, channels, bias=cfg.bias)
            nn.init.zeros_(self.up.weight)
        else:
            self.down = QuantLinear(channels, cfg.dim, cfg.quantizer, bias=cfg.bias)
            self.up = QuantLinear(cfg.dim, channels, cfg.quantizer, bias=cfg.bias)
            nn.init.trunc_normal_(self.up.weight, std=0.001, a=-0.002, b=0.002)
        for layer in (self.down, self.up):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.act = get_act_layer(cfg.activation)()
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.scale
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim != -1:
            x = x.movedim(self.channel_dim, -1)  # (B, H, W, C)
        y = self.up(self.dropout(self.act(self.down(x)))) * self.scale
        return y.movedim(-1, self.channel_dim) if self.channel_dim != -1 else y


class SequentialAdapter(nn.Module):
    """``y = inner(x); y + adapter(y)`` (Houlsby/Pfeiffer placement)."""

    def __init__(self, inner: nn.Module, adapter: Adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + self.adapter(y)


class ParallelAdapter(nn.Module):
    """``inner(x) + adapter(x)`` beside an MLP (non-ViT blocks: ConvNeXt)."""

    def __init__(self, inner: nn.Module, adapter: Adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.adapter(x)


class AdaptFormerBlock(nn.Module):
    """A timm ViT block with AdaptFormer's adapter beside its MLP branch, fed the residual stream:

    ``x = x + attn branch;  x = x + mlp branch(x) + adapter(x)`` (the block's own steps, in timm's order).
    """

    def __init__(self, inner: ViTBlock, adapter: Adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b = self.inner
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))  # (B, N, D)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.adapter(x)


def _block_out_channels(block: nn.Module) -> int:
    norms = [m for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d) and not n.startswith("downsample")]
    return norms[-1].num_features


def mlp_sites(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """``(name, module, channels, channel_dim)`` of every MLP with ``fc1``/``fc2`` (timm ViT and ConvNeXt blocks)."""
    sites = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp" and hasattr(module, "fc1") and hasattr(module, "fc2"):
            fc2 = module.fc2
            channels = fc2.out_features if isinstance(fc2, nn.Linear) else fc2.out_channels
            sites.append((name, module, channels, -1 if isinstance(fc2, nn.Linear) else 1))
    return sites


def residual_block_sites(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """``(name, block, channels, 1)`` of every ResNet residual block (channels-first)."""
    return [(n, m, _block_out_channels(m), 1) for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]


def vit_blocks(model: nn.Module) -> list[tuple[str, ViTBlock]]:
    """``(name, block)`` of every plain timm ViT block (AdaptFormer's sites)."""
    return [(n, m) for n, m in model.named_modules() if type(m) is ViTBlock]


def wrap_sites(model: nn.Module, sites, wrapper: type[nn.Module], cfg: AdapterConfig) -> list[str]:
    """Replace every site ``(name, module, channels, channel_dim)`` by ``wrapper(module, Adapter(...))``; their names."""
    if not sites:
        raise ConfigError(f"{type(model).__name__} has no adapter sites (an 'mlp' with fc1/fc2, or ResNet blocks)")
    for name, module, channels, channel_dim in sites:
        replace_submodule(model, name, wrapper(module, Adapter(channels, cfg, channel_dim)))
    return [site[0] for site in sites]
