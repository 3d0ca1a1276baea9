"""Parameter-efficient fine-tuning pieces (pure torch + timm, no Lightning).

* SSF (Scaling & Shifting Your Features, Lian et al. 2022): per-channel ``y = scale * op(x) + shift`` after
  linear/conv/norm ops, inserted by replacing named submodules with :class:`SSF`, and folded back into the
  wrapped op by :func:`merge_ssf` so the deployed model is the plain timm model.
* Bottleneck adapters, sequential (Houlsby/Pfeiffer) or parallel (AdaptFormer), with a zero-initialised
  up-projection, and their low-bit variant (Jie et al. 2023, "Revisiting the Parameter Efficiency of
  Adapters from the Perspective of Precision Redundancy"): :class:`QuantLinear` with a straight-through
  estimator, :func:`pack_bits` and :func:`task_storage_bytes`.
* A hierarchical side network (Hierarchical Side-Tuning, Lin et al. 2023) fed by intermediate activations
  of the frozen backbone via timm's ``forward_intermediates``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerNorm2d
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from modules.components.errors import ConfigError


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
def ssf_site(module: nn.Module) -> tuple[int, int] | None:
    """``(channels, channel_dim)`` when an SSF after ``module`` can be folded into its own weights.

    Foldable: linear/conv with a bias, affine LayerNorm/BatchNorm/GroupNorm. Bias-free convs (ResNet) are
    skipped: each is followed by a BatchNorm whose SSF absorbs the same per-channel affine map (the frozen
    backbone runs its norms in eval mode). ``BatchNormAct2d`` applies an activation after the affine, so an
    SSF after it cannot be folded and it is skipped too.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if module.bias is None:
            return None
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        return channels, (-1 if isinstance(module, nn.Linear) else 1)
    if isinstance(module, nn.LayerNorm):
        if module.weight is None or module.bias is None or len(module.normalized_shape) != 1:
            return None
        return module.normalized_shape[0], (1 if isinstance(module, LayerNorm2d) else -1)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, BatchNormAct2d):
        return (module.num_features, 1) if module.affine else None
    if isinstance(module, nn.GroupNorm):
        return (module.num_channels, 1) if module.affine else None
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
    def merge(self) -> nn.Module:
        """Fold into the wrapped op: W' = scale * W, b' = scale * b + shift (norms: on their affine)."""
        inner, scale, shift = self.inner, self.ssf_scale.detach(), self.ssf_shift.detach()
        weight = inner.weight
        if isinstance(inner, (nn.Linear, nn.Conv2d)):
            weight.mul_(scale.view(-1, *[1] * (weight.ndim - 1)))
        else:
            weight.mul_(scale)
        inner.bias.mul_(scale).add_(shift)
        return inner


def insert_ssf(model: nn.Module, exclude: tuple[str, ...] = (), init_std: float = 0.02) -> list[str]:
    """Wrap every foldable op of ``model`` (except names under ``exclude``) in :class:`SSF`; returns their names."""
    if any(isinstance(m, SSF) for m in model.modules()):
        raise ConfigError("the model already has SSF layers: insert_ssf must run once")
    names = []
    for name, module in list(model.named_modules()):
        site = ssf_site(module)
        if not name or site is None or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        replace_submodule(model, name, SSF(module, *site, init_std=init_std))
        names.append(name)
    return names


def merge_ssf(model: nn.Module) -> nn.Module:
    """Fold every :class:`SSF` of ``model`` into the op it wraps, in place; the result has no SSF modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SSF):
            replace_submodule(model, name, module.merge())
    return model


def unwrap_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen backbone inside a PEFT state dict, under the plain timm names (SSF/adapter tensors dropped).

    Lets a PEFT run's checkpoint serve as ``init_checkpoint``: its wrapped ops keep the original weights.
    """
    plain = {}
    for name, value in state.items():
        parts = name.split(".")
        if "adapter" in parts or parts[-1] in ("ssf_scale", "ssf_shift"):
            continue
        plain[".".join(p for p in parts if p != "inner")] = value
    return plain


# --------------------------------------------------------------------------------------------------
# Low-bit weights
# --------------------------------------------------------------------------------------------------
def code_range(bits: int) -> tuple[int, int]:
    """Signed integer codes of a ``bits``-bit mid-rise grid: 2**bits levels ``(code + 0.5) * step``."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"adapter bits must be in 1..8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def computed_step(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row grid step (rows,): 1 bit -> levels +-mean|w| (L2-optimal), else max|w| on the outermost level.

    Both rules are idempotent (quantized weights give back the same step), so a task file that stores
    only codes and steps reloads to bit-identical weights.
    """
    flat = weight.detach().abs().flatten(1)
    if bits == 1:
        return 2 * flat.mean(dim=1)
    return 2 * flat.amax(dim=1) / (2**bits - 1)


def quantize_codes(weight: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (same shape as ``weight``) on the mid-rise grid with per-row ``step`` (rows,)."""
    lo, hi = code_range(bits)
    step = step.detach().clamp_min(torch.finfo(weight.dtype).tiny).view(-1, *[1] * (weight.ndim - 1))
    return torch.round((weight.detach() / step - 0.5).clamp(lo, hi))


def dequantize(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return (codes + 0.5) * step.view(-1, *[1] * (codes.ndim - 1))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes -> uint8 tensor of ``ceil(numel * bits / 8)`` bytes."""
    lo, _ = code_range(bits)
    unsigned = (codes.detach().flatten().to(torch.int64) - lo).cpu().numpy().astype(np.uint8)
    planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (N, bits)
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 codes (numel,)."""
    lo, _ = code_range(bits)
    planes = np.unpackbits(packed.cpu().numpy(), count=numel * bits).reshape(numel, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(axis=1) + lo)


class QuantLinear(nn.Linear):
    """Linear layer whose weight is used quantized to ``bits`` bits (straight-through estimator).

    The latent fp32 weight trains; the forward pass sees ``(code + 0.5) * step`` per row, so every row
    takes at most 2**bits values. ``scale='computed'`` derives the step from the weights
    (:func:`computed_step`); ``'learned'`` multiplies it by a learned per-row gain (init 1). The bias stays fp32.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 1, scale: str = "computed"):
        super().__init__(in_features, out_features)
        code_range(bits)
        if scale not in ("computed", "learned"):
            raise ConfigError(f"adapter quant_scale must be 'computed' or 'learned', got '{scale}'")
        self.bits = bits
        self.step_gain = nn.Parameter(torch.ones(out_features)) if scale == "learned" else None

    def step(self) -> torch.Tensor:
        step = computed_step(self.weight, self.bits)  # (out,)
        return step * self.step_gain if self.step_gain is not None else step

    def quantized_weight(self) -> torch.Tensor:
        step = self.step()
        hard = dequantize(quantize_codes(self.weight, step, self.bits), step)
        return hard + (self.weight - self.weight.detach())  # value: hard; gradient to the latent weight: identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def codes_and_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step().detach().clone()
        return quantize_codes(self.weight, step, self.bits).to(torch.int8), step

    @torch.no_grad()
    def load_quantized(self, codes: torch.Tensor, step: torch.Tensor) -> None:
        """Set the latent weight so the forward reproduces ``dequantize(codes, step)``."""
        self.weight.copy_(dequantize(codes.to(self.weight.dtype), step))
        if self.step_gain is not None:
            base = computed_step(self.weight, self.bits)
            self.step_gain.copy_(torch.where(base > 0, step / base.clamp_min(1e-30), torch.ones_like(step)))


def task_storage_bytes(model: nn.Module) -> int:
    """Bytes to store the trainable parameters: low-bit weights at their bits (+ one fp32 step per row),
    everything else in its own dtype (fp32: 4 bytes per value). Learned step gains fold into the step."""
    total, counted = 0, set()
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight.requires_grad:
            total += math.ceil(module.weight.numel() * module.bits / 8) + module.out_features * 4
            counted.add(id(module.weight))
            if module.step_gain is not None:
                counted.add(id(module.step_gain))
    for p in model.parameters():
        if p.requires_grad and id(p) not in counted:
            total += p.numel() * p.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------
@dataclass
class AdapterConfig:
    """Bottleneck adapter settings.

    Args:
        dim: bottleneck width.
        scale: multiplier of the adapter output (AdaptFormer's s).
        style: ``parallel`` (AdaptFormer: beside the MLP, fed its input) or ``sequential`` (after the
            MLP / residual block, fed its output). CNN blocks without an MLP allow only ``sequential``.
        bits: quantize the adapter weights to 1..8 bits; ``None`` keeps fp32.
        quant_scale: ``computed`` or ``learned`` grid step for low-bit weights.
    """

    dim: int = 8
    scale: float = 1.0
    style: str = "parallel"
    bits: int | None = None
    quant_scale: str = "computed"


class Adapter(nn.Module):
    """``scale * up(act(down(x)))`` over the channel axis; ``up`` starts at zero so the adapter starts as 0."""

    def __init__(self, channels: int, cfg: AdapterConfig, channel_dim: int = -1):
        super().__init__()
        if cfg.bits is None:
            self.down, self.up = nn.Linear(channels, cfg.dim), nn.Linear(cfg.dim, channels)
        else:
            self.down = QuantLinear(channels, cfg.dim, cfg.bits, cfg.quant_scale)
            self.up = QuantLinear(cfg.dim, channels, cfg.bits, cfg.quant_scale)
        self.act = nn.GELU()
        self.scale = cfg.scale
        self.channel_dim = channel_dim
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim != -1:
            x = x.movedim(self.channel_dim, -1)  # (B, H, W, C)
        y = self.up(self.act(self.down(x))) * self.scale
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
    """``inner(x) + adapter(x)`` (AdaptFormer placement beside the MLP)."""

    def __init__(self, inner: nn.Module, adapter: Adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.adapter(x)


def _block_out_channels(block: nn.Module) -> int:
    norms = [m for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d) and not n.startswith("downsample")]
    return norms[-1].num_features


def insert_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Wrap adapter sites of ``model``; returns their names.

    Sites: every MLP with ``fc1``/``fc2`` (ViT blocks, ConvNeXt blocks), else every ResNet residual block
    (sequential only, channels-first).
    """
    if cfg.style not in ("parallel", "sequential"):
        raise ConfigError(f"adapter style must be 'parallel' or 'sequential', got '{cfg.style}'")
    wrapper = ParallelAdapter if cfg.style == "parallel" else SequentialAdapter
    sites = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp" and hasattr(module, "fc1") and hasattr(module, "fc2"):
            fc2 = module.fc2
            channels = fc2.out_features if isinstance(fc2, nn.Linear) else fc2.out_channels
            sites.append((name, module, channels, -1 if isinstance(fc2, nn.Linear) else 1))
    if not sites:
        blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]
        if blocks and cfg.style == "parallel":
            raise ConfigError("parallel adapters need blocks with an MLP (ViT, ConvNeXt): use style 'sequential' for ResNets")
        sites = [(n, m, _block_out_channels(m), 1) for n, m in blocks]
    if not sites:
        raise ConfigError(f"{type(model).__name__} has no adapter sites (an 'mlp' with fc1/fc2, or ResNet blocks)")
    for name, module, channels, channel_dim in sites:
        replace_submodule(model, name, wrapper(module, Adapter(channels, cfg, channel_dim)))
    return [s[0] for s in sites]


# --------------------------------------------------------------------------------------------------
# Hierarchical side network
# --------------------------------------------------------------------------------------------------
@dataclass
class SideConfig:
    """Side network settings.

    Args:
        dim: channels of the side stream.
        taps: backbone intermediates it reads (timm ``forward_intermediates`` indices; an int n = the last n).
    """

    dim: int = 32
    taps: int | list[int] = field(default=4)


class SideBlock(nn.Module):
    """Light ConvNeXt-style block of the side stream: depthwise 3x3, norm, pointwise MLP, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.GroupNorm(1, dim)
        self.fc1 = nn.Conv2d(dim, 2 * dim, 1)
        self.fc2 = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(self.dwconv(x)))))


class SideNetwork(nn.Module):
    """Side stream fed, level by level, by the frozen backbone's intermediate maps; ends in the task head.

    Each tap is projected to ``dim`` channels (1x1 conv) and added to the side stream, which is pooled to
    the tap's resolution first (coarse-to-fine backbones make it multi-scale; isotropic ViTs keep the token
    grid), then refined by a :class:`SideBlock`. Global pooling + LayerNorm + linear head give the logits.

    Args:
        in_channels: channels of each tap, in the order they arrive.
        dim: side-stream channels.
        num_classes: classifier outputs.
    """

    def __init__(self, in_channels: list[int], dim: int, num_classes: int):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.blocks = nn.ModuleList(SideBlock(dim) for _ in in_channels)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        side = None
        for feature, lateral, block in zip(features, self.laterals, self.blocks):
            x = lateral(feature)  # (B, dim, H_i, W_i)
            if side is not None:
                x = x + (side if side.shape[-2:] == x.shape[-2:] else F.adaptive_avg_pool2d(side, x.shape[-2:]))
            side = block(x)
        return self.norm(side.mean(dim=(2, 3)))  # (B, dim)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.forward_features(features))


def backbone_intermediates(backbone: nn.Module, images: torch.Tensor, taps: int | list[int]) -> list[torch.Tensor]:
    """NCHW intermediate maps of a timm model (``forward_intermediates``; ViT prefix tokens dropped)."""
    if not hasattr(backbone, "forward_intermediates"):
        raise ConfigError(f"{type(backbone).__name__} has no forward_intermediates: side-tuning needs a timm model that has it")
    return backbone.forward_intermediates(images, indices=taps, intermediates_only=True)
