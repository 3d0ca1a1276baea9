"""BitNet b1.58 in pure torch: ternary weights, normalised 8-bit activations, a packed 2-bit export.

As in The Era of 1-bit LLMs (Ma et al., 2024) and its training-tips code: the weight quantizer is
``W_q = gamma * RoundClip(W / gamma, -1, 1)`` with one *per-tensor* ``gamma = mean(|W|)`` (``AbsMean``);
BitLinear normalises its input with a parameter-free RMSNorm, then quantizes it to 8 bits by absmax *per
token* (``x_q = clip(round(x * 127 / max|x|), -128, 127) * max|x| / 127``); both use straight-through
gradients. Variants, chosen by ``class_path``: a per-output-channel scale (``AbsMean(per_channel=True)``),
the median scale of BitNet b1.58 Reloaded (``AbsMedian``), a parameter-free LayerNorm or no input norm.

Convolutions get the same recipe with one pixel's channel vector as the token (the papers define only
BitLinear): the norm and the absmax run over the channel dimension at every position.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence

import torch
from torch import nn

from modules.components.quant.int8 import default_skip, quantizable_layers, replace_submodule, round_ste


# --- weight scales -------------------------------------------------------------------------------
class TernaryScale:
    """``gamma`` of the ternary quantizer, per tensor (default) or per output channel.

    Args:
        per_channel: one gamma per output channel (row of the weight) instead of one per tensor.
        eps: lower bound of gamma (1e-5 in the paper's code).
    """

    def __init__(self, per_channel: bool = False, eps: float = 1e-5):
        self.per_channel, self.eps = per_channel, eps

    def reduce(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """Statistic of ``|W|`` along the last dim: (out, fan_in) -> (out,), or (1, numel) -> (1,)."""
        raise NotImplementedError

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """gamma broadcastable to ``weight``: (out, 1, ...) per channel, (1, 1, ...) per tensor."""
        magnitudes = weight.detach().abs()
        flat = magnitudes.flatten(1) if self.per_channel else magnitudes.reshape(1, -1)
        shape = (-1 if self.per_channel else 1, *([1] * (weight.dim() - 1)))
        return self.reduce(flat).clamp_min(self.eps).view(shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(per_channel={self.per_channel})"


class AbsMean(TernaryScale):
    """gamma = mean(|W|): BitNet b1.58's absmean quantizer (per tensor in the paper)."""

    def reduce(self, magnitudes: torch.Tensor) -> torch.Tensor:
        return magnitudes.mean(dim=1)


class AbsMedian(TernaryScale):
    """gamma = median(|W|) (BitNet b1.58 Reloaded); for an even count, the lower of the two middle values."""

    def reduce(self, magnitudes: torch.Tensor) -> torch.Tensor:
        return magnitudes.median(dim=1).values


# --- parameter-free input norms ------------------------------------------------------------------
class RMSNorm:
    """``x / sqrt(mean(x^2) + eps)`` over the feature dimension, no learned gain (BitLinear's default)."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def __call__(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=dim, keepdim=True) + self.eps)


class LayerNorm:
    """``(x - mean) / sqrt(var + eps)`` over the feature dimension, no learned affine (BitNet's SubLN form)."""

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def __call__(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        mean = x.mean(dim=dim, keepdim=True)
        var = x.var(dim=dim, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps)


# --- quantizers ----------------------------------------------------------------------------------
def ternary_codes(weight: torch.Tensor, scale: TernaryScale) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes in {-1, 0, 1} with the shape of ``weight`` and gamma (broadcastable to it)."""
    gamma = scale(weight)
    return (weight.detach() / gamma).round().clamp(-1, 1).to(torch.int8), gamma


def ternary_weight(weight: torch.Tensor, scale: TernaryScale) -> torch.Tensor:
    """``gamma * RoundClip(W / gamma, -1, 1)`` with the identity as gradient to ``W`` (straight through)."""
    codes, gamma = ternary_codes(weight, scale)
    return codes.to(weight.dtype) * gamma + (weight - weight.detach())


def absmax_activation(x: torch.Tensor, bits: int = 8, dim: int = -1) -> torch.Tensor:
    """Symmetric absmax fake-quant per token: ``max|x|`` along ``dim``, codes in [-2^(b-1), 2^(b-1) - 1]."""
    qmax = 2 ** (bits - 1) - 1
    step = x.detach().abs().amax(dim=dim, keepdim=True).clamp_min(1e-5) / qmax
    return round_ste(x / step).clamp(-qmax - 1, qmax) * step


class _BitLayer:
    """What BitLinear and BitConv2d share: the quantizer settings and the input path."""

    weight_scale: TernaryScale = AbsMean()
    input_norm: RMSNorm | LayerNorm | None = RMSNorm()
    activation_bits: int | None = 8
    feature_dim: int = -1

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x, self.feature_dim)
        if self.activation_bits:
            x = absmax_activation(x, self.activation_bits, self.feature_dim)
        return x


class BitLinear(_BitLayer, nn.Linear):
    """nn.Linear with BitNet b1.58's forward: norm, 8-bit absmax per token, ternary weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return nn.functional.linear(self.quantize_input(x), ternary_weight(self.weight, self.weight_scale), self.bias)


class BitConv2d(_BitLayer, nn.Conv2d):
    """nn.Conv2d with the BitLinear recipe; each pixel's channel vector is a token."""

    feature_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self._conv_forward(self.quantize_input(x), ternary_weight(self.weight, self.weight_scale), self.bias)


BIT_LAYERS = (BitLinear, BitConv2d)


def to_bitnet(model: nn.Module, weight_scale: TernaryScale | None = None, activation_bits: int | None = 8,
              input_norm: RMSNorm | LayerNorm | None = RMSNorm(), skip: Sequence[str] | None = None) -> list[str]:
    """Swap Linear/Conv2d layers for BitLinear/BitConv2d in place, sharing the same Parameter objects.

    Sharing keeps the optimizer's references and the state-dict keys; returns the swapped names. ``skip``
    defaults to the timm model's stem conv and classifier (:func:`default_skip`).
    """
    skip = default_skip(model) if skip is None else skip
    swapped = []
    for name, layer in quantizable_layers(model, skip).items():
        if isinstance(layer, BIT_LAYERS):
            continue
        new = copy.copy(layer)  # shares parameters, buffers and hooks; only the forward changes
        new.__class__ = BitLinear if isinstance(layer, nn.Linear) else BitConv2d
        new.weight_scale = weight_scale or AbsMean()
        new.activation_bits, new.input_norm = activation_bits, input_norm
        replace_submodule(model, name, new)
        swapped.append(name)
    return swapped


# --- packed export (2 bits per weight) -----------------------------------------------------------
def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} codes -> uint8, four 2-bit fields ``code + 1`` per byte, the first code in the low bits."""
    flat = (codes.flatten().to(torch.int16) + 1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 4)]).view(-1, 4)
    return flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 codes of ``shape``."""
    fields = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).flatten()
    return (fields[: math.prod(shape)].to(torch.int8) - 1).view(*shape)


def ternary_state(model: nn.Module) -> dict[str, dict]:
    """The model with its BitNet weights packed: ``{"ternary": {layer: {packed, shape, scale}}, "float": {...}}``.

    ``float`` holds every other state-dict entry (biases, norms, float layers) as is, so the payload
    rebuilds the whole model (:func:`load_ternary`) and its serialized size is the model's real size.
    """
    ternary, packed_keys = {}, set()
    for name, layer in model.named_modules():
        if isinstance(layer, BIT_LAYERS):
            codes, gamma = ternary_codes(layer.weight, layer.weight_scale)
            ternary[name] = {"packed": pack_ternary(codes), "shape": list(codes.shape),
                             "scale": gamma.flatten().float().cpu()}
            packed_keys.add(f"{name}.weight" if name else "weight")
    rest = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in packed_keys}
    return {"ternary": ternary, "float": rest}


@torch.no_grad()
def load_ternary(model: nn.Module, payload: dict[str, dict]) -> None:
    """Load a :func:`ternary_state` payload into ``model`` (weights become ``codes * scale``)."""
    model.load_state_dict(payload["float"], strict=False)
    for name, entry in payload["ternary"].items():
        weight = model.get_submodule(name).weight
        codes = unpack_ternary(entry["packed"], entry["shape"]).to(weight.dtype)
        scale = entry["scale"].to(weight.dtype).view(-1, *([1] * (codes.dim() - 1)))
        weight.copy_(codes * scale)


def ternary_bytes(model: nn.Module) -> int:
    """Serialized size of :func:`ternary_state` (2 bits per ternary weight, everything else as stored)."""
    buffer = io.BytesIO()
    torch.save(ternary_state(model), buffer)
    return buffer.getbuffer().nbytes
