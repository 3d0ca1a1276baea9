"""Low-bit weights for adapters (pure torch, no Lightning).

Low-bit adapters (Jie, Wang & Deng 2023, "Revisiting the Parameter Efficiency of Adapters from the
Perspective of Precision Redundancy"): the adapter weights train latent in fp32 and are used quantized with a
straight-through estimator. Two quantizers, chosen by ``class_path``:

* :class:`NormalQuantile` (the paper's code, default): standardise each weight *tensor* by its mean and
  standard deviation and round to a codebook fitted to a standard normal (at 1 bit the levels are
  +-0.6745, the quartiles of N(0, 1)). Stored: the codes plus one fp32 mean and std per tensor.
* :class:`UniformGrid` (visionlab's earlier quantizer, kept as an option): a mid-rise uniform grid per
  output row, step ``2 * mean|w|`` at 1 bit and ``2 * max|w| / (2**bits - 1)`` above, optionally times a
  learned per-row gain. Stored: the codes plus one fp32 step per row. It has no outlier-robust scale, so at
  2-4 bits on Gaussian-like weights its error is larger than the codebook's (see ``benchmarks/peft.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.components.parts import Part
from modules.components.errors import ConfigError


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ConfigError(f"adapter bits must be in 1..8, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes in ``[0, 2**bits)`` -> uint8 tensor of ``ceil(numel * bits / 8)`` bytes."""
    unsigned = codes.detach().flatten().to(torch.int64).cpu().numpy().astype(np.uint8)
    planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (N, bits)
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 codes (numel,)."""
    planes = np.unpackbits(packed.cpu().numpy(), count=numel * bits).reshape(numel, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(axis=1))


def normal_codebook(bits: int, iterations: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels (2**bits,) and decision boundaries (2**bits - 1,) of the paper's codebook for N(0, 1).

    The fixed point of: boundaries = midpoints of the levels; each level = the median of its cell
    (``Phi(level) = (Phi(lower) + Phi(upper)) / 2``). Started from all-zero levels as the paper's code does;
    at 1 bit it is reached in one step: levels ``Phi^-1(1/4), Phi^-1(3/4) = -+0.6745``.
    """
    _check_bits(bits)
    levels = torch.zeros(2**bits, dtype=torch.float64)
    for _ in range(iterations):
        bounds = (levels[1:] + levels[:-1]) / 2
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(bounds), torch.ones(1, dtype=torch.float64)])
        levels = torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2)
    return levels.float(), ((levels[1:] + levels[:-1]) / 2).float()


class WeightQuantizer(Part):
    """How a :class:`QuantLinear` turns its latent weight into low-bit values, and how those are stored.

    Args:
        bits: bits per weight (1..8).
    """

    def __init__(self, bits: int = 1):
        _check_bits(bits)
        self.bits = bits

    def bind(self, layer: "QuantLinear") -> None:
        """Register the quantizer's own trainable parameters on its host ``layer`` (none by default); one
        quantizer serves every layer of an adapter, each binding it once."""

    def quantized_weight(self, layer: "QuantLinear") -> torch.Tensor:
        """The weight the forward pass uses; gradients reach the latent weight straight through."""
        raise NotImplementedError

    def encode(self, layer: "QuantLinear") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unsigned codes (weight's shape) and the fp32 tensors needed to decode them."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def storage_bytes(self, layer: "QuantLinear") -> int:
        """Bytes of the packed codes plus the decode tensors."""
        raise NotImplementedError



class NormalQuantile(WeightQuantizer):
    """Per-tensor standardisation + normal-quantile codebook (the paper's quantizer).

    ``w_q = codebook[code(z)] * std + mean`` with ``z = (w - mean) / (std + 1e-5)``; the straight-through
    estimator acts on ``z`` (the statistics stay differentiable), as in the paper's ``QLinear``.
    """

    eps = 1e-5

    def _levels(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_codebook"):
            self._codebook = normal_codebook(self.bits)
        return tuple(t.to(device) for t in self._codebook)

    def _standardise(self, weight: torch.Tensor):
        mean, std = weight.mean(), weight.std()
        return (weight - mean) / (std + self.eps), mean, std

    def quantized_weight(self, layer: "QuantLinear") -> torch.Tensor:
        z, mean, std = self._standardise(layer.weight)
        levels, bounds = self._levels(z.device)
        hard = levels.to(z.dtype)[torch.bucketize(z.detach(), bounds.to(z.dtype))]
        return (hard + z - z.detach()) * std + mean

    @torch.no_grad()
    def encode(self, layer: "QuantLinear") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, mean, std = self._standardise(layer.weight)
        _, bounds = self._levels(z.device)
        return torch.bucketize(z, bounds.to(z.dtype)), {"mean": mean.float().cpu(), "std": std.float().cpu()}

    def decode(self, codes: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        levels, _ = self._levels(codes.device)
        return levels[codes.long()] * side["std"] + side["mean"]

    def storage_bytes(self, layer: "QuantLinear") -> int:
        return math.ceil(layer.weight.numel() * self.bits / 8) + 2 * 4


class UniformGrid(WeightQuantizer):
    """Per-row mid-rise uniform grid ``(code + 0.5) * step`` (visionlab's earlier quantizer).

    Args:
        bits: bits per weight.
        learned_step: multiply the computed per-row step by a learned gain (init 1).
    """

    def __init__(self, bits: int = 1, learned_step: bool = False):
        super().__init__(bits)
        self.learned_step = learned_step

    @property
    def code_range(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def bind(self, layer: "QuantLinear") -> None:
        layer.step_gain = nn.Parameter(torch.ones(layer.out_features)) if self.learned_step else None

    def computed_step(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-row step (rows,): 1 bit -> levels +-mean|w| (L2-optimal), else max|w| on the outermost level."""
        flat = weight.detach().abs().flatten(1)
        if self.bits == 1:
            return 2 * flat.mean(dim=1)
        return 2 * flat.amax(dim=1) / (2**self.bits - 1)

    def step(self, layer: "QuantLinear") -> torch.Tensor:
        step = self.computed_step(layer.weight)
        return step * layer.step_gain if layer.step_gain is not None else step

    def _signed_codes(self, weight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        lo, hi = self.code_range
        step = step.detach().clamp_min(torch.finfo(weight.dtype).tiny)[:, None]
        return torch.round((weight.detach() / step - 0.5).clamp(lo, hi))

    def quantized_weight(self, layer: "QuantLinear") -> torch.Tensor:
        step = self.step(layer)
        hard = (self._signed_codes(layer.weight, step) + 0.5) * step[:, None]
        return hard + (layer.weight - layer.weight.detach())

    @torch.no_grad()
    def encode(self, layer: "QuantLinear") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step = self.step(layer).detach()
        return (self._signed_codes(layer.weight, step) - self.code_range[0]).long(), {"step": step.float().cpu()}

    def decode(self, codes: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        return (codes.float() + self.code_range[0] + 0.5) * side["step"][:, None]

    def storage_bytes(self, layer: "QuantLinear") -> int:
        return math.ceil(layer.weight.numel() * self.bits / 8) + layer.out_features * 4


class QuantLinear(nn.Linear):
    """Linear layer whose weight is used quantized by ``quantizer`` (straight-through estimator).

    After :meth:`load_packed` the layer holds the decoded weight and uses it as is (a deployed task file),
    exactly what the training model computed; training it again re-enables quantization.
    """

    def __init__(self, in_features: int, out_features: int, quantizer: WeightQuantizer, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.quantizer = quantizer
        self.bits = quantizer.bits
        self.decoded = False
        quantizer.bind(self)

    def train(self, mode: bool = True):
        if mode:
            self.decoded = False
        return super().train(mode)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.decoded else self.quantizer.quantized_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def pack(self) -> dict:
        """Task-file entry: bit-packed codes + the quantizer's decode tensors."""
        codes, side = self.quantizer.encode(self)
        return {"bits": self.bits, "shape": list(codes.shape), "codes": pack_bits(codes, self.bits), **side}

    @torch.no_grad()
    def load_packed(self, entry: dict) -> None:
        if entry["bits"] != self.bits or list(entry["shape"]) != list(self.weight.shape):
            raise ConfigError(f"task file holds {entry['bits']}-bit {entry['shape']} weights, the layer is {self.bits}-bit {list(self.weight.shape)}")
        codes = unpack_bits(entry["codes"], self.bits, self.weight.numel()).view(self.weight.shape)
        side = {k: v for k, v in entry.items() if k not in ("bits", "shape", "codes")}
        self.weight.copy_(self.quantizer.decode(codes, side))
        self.decoded = True


def task_storage_bytes(model: nn.Module) -> int:
    """Bytes to store the trainable parameters: low-bit weights packed (+ their decode tensors), everything
    else in its own dtype. Learned step gains fold into the stored step."""
    total, counted = 0, set()
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight.requires_grad:
            total += module.quantizer.storage_bytes(module)
            counted.add(id(module.weight))
            if getattr(module, "step_gain", None) is not None:
                counted.add(id(module.step_gain))
    return total + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and id(p) not in counted)


def relative_error(quantizer: WeightQuantizer, weight: torch.Tensor) -> float:
    """``||Q(W) - W|| / ||W||`` of ``quantizer`` on ``weight`` (out, in)."""
    layer = QuantLinear(weight.shape[1], weight.shape[0], quantizer, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        return float((layer.quantized_weight() - weight).norm() / weight.norm())
