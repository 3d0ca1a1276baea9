"""LoRA and DoRA layers over timm's linears and convs (pure torch, no Lightning).

* LoRA (Hu et al. 2021): ``y = W x + b + (alpha / rank) * B A x`` with ``A`` (rank, in) Kaiming-uniform and ``B``
  (out, rank) zero, so the wrapped model starts as the plain one. Convs follow LoCon (LyCORIS): ``A`` is a conv
  with the wrapped conv's kernel, stride, padding and dilation down to ``rank`` channels, ``B`` a 1x1 conv back up,
  so the update ``B A`` is a (out, in, k, k) kernel and folds into the conv's own weight.
* DoRA (Liu et al. 2024): the weight is split into a trained magnitude ``m`` (one value per output channel,
  initialised to ``||W||``) and a direction ``W + s B A`` (the LoRA update), normalised per output channel:
  ``W' = m * (W + s B A) / ||W + s B A||``. The norm runs over each output channel's fan-in (a weight row of a
  linear, a (in, k, k) filter of a conv), and it is detached from the graph (the paper's section 4.3, as
  Hugging Face peft's ``DoraLinearLayer``): it follows ``B A`` but passes no gradient.

Both merge into the wrapped layer's weight (:meth:`LoRALayer.merged`): the deployed model is the plain timm one.
With branch dropout, DoRA computes ``m / ||W + s B A|| * (W x + s B A dropout(x)) + b``, which is peft's
``(m/||.|| - 1) W x + m/||.|| s B A dropout(x)`` added to the base layer's output.

Written here rather than taken from Hugging Face ``peft`` (which does support timm models): peft wraps the model in a
``PeftModel`` that renames every parameter (``base_model.model.<name>.base_layer.weight``) and brings transformers
and accelerate along; these layers follow the project's wrapper pattern instead (``inner`` as SSF's, a trainable
sub-module for the branch), so task files, ``transfer.unwrap_state_dict``, the frozen-backbone eval mode and the
merge into plain timm work as for the other methods, in ~150 lines.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.peft.layers import replace_submodule


def lora_target(module: nn.Module) -> bool:
    """True for the layers LoRA wraps: any ``nn.Linear``, and a plain (zero-padded, ungrouped) ``nn.Conv2d``.

    Grouped/depthwise convs (a (C, 1, k, k) kernel has no low-rank structure worth adding) and conv subclasses
    with their own forward (timm's ``Conv2dSame``, weight-standardised convs) are left alone.
    """
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward and module.groups == 1
            and module.padding_mode == "zeros")


class LoRABranch(nn.Module):
    """The low-rank path ``up(down(dropout(x)))`` beside a linear or conv (trainable as a whole, so it follows
    the owner's train/eval mode while the frozen layer beside it stays in eval mode)."""

    def __init__(self, layer: nn.Module, rank: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                  bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        self.to(layer.weight)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # LoRA's (and peft's) A; B = 0: no change at start
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.dropout(x)))

    def delta_weight(self) -> torch.Tensor:
        """``B A`` in the wrapped layer's weight shape: (out, in) or (out, in, k, k)."""
        down = self.down.weight
        return (self.up.weight.flatten(1) @ down.flatten(1)).view(-1, *down.shape[1:])


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel's weights (over fan-in and kernel): (out,)."""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


class LoRALayer(nn.Module):
    """A frozen linear/conv (``inner``) plus a LoRA branch; with ``dora``, also DoRA's magnitude.

    Args:
        inner: the wrapped ``nn.Linear`` or ``nn.Conv2d`` (see :func:`lora_target`).
        rank: rank of the update ``B A``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the branch's input.
        dora: learn DoRA's per-output-channel magnitude ``lora_magnitude`` (initialised to ``||W||``).
    """

    def __init__(self, inner: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        self.inner = inner
        self.scaling = alpha / rank
        self.lora = LoRABranch(inner, rank, dropout)
        self.dora = dora
        if dora:
            self.lora_magnitude = nn.Parameter(channel_norm(inner.weight.detach()).clone())

    def _base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped op with ``weight`` and no bias."""
        if isinstance(self.inner, nn.Linear):
            return F.linear(x, weight)
        conv = self.inner
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    def _channels(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, 1, 1) if isinstance(self.inner, nn.Conv2d) else values  # broadcast over (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora(x) * self.scaling
        if not self.dora:
            return self.inner(x) + update
        weight = self.inner.weight
        # ||W + s B A|| per output channel, detached (DoRA section 4.3): it follows B A but takes no gradient
        norm = channel_norm(weight + self.scaling * self.lora.delta_weight().detach()).detach()
        scale = self._channels(self.lora_magnitude / norm)
        out = scale * (self._base(x, weight) + update)  # m * (W x + s B A x) / ||W + s B A||
        bias = self.inner.bias
        return out if bias is None else out + self._channels(bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight of the equivalent plain layer: ``W + s B A`` (LoRA), ``m (W + s B A) / ||W + s B A||`` (DoRA)."""
        weight = self.inner.weight
        direction = weight.double() + self.scaling * self.lora.delta_weight().double()
        if self.dora:
            shape = (-1,) + (1,) * (weight.ndim - 1)
            direction = direction * (self.lora_magnitude.double() / channel_norm(direction)).view(shape)
        return direction.to(weight.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """``inner`` with the update folded into its weight (this layer's ``inner`` is changed in place)."""
        self.inner.weight.copy_(self.merged_weight())
        return self.inner


def lora_sites(model: nn.Module, patterns: list[str] | None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the layers of ``model`` that LoRA wraps.

    ``patterns``: fnmatch patterns over dotted module names; a pattern also matches as a suffix after a dot
    (``qkv`` matches ``blocks.0.attn.qkv``, ``attn.proj`` matches ``blocks.3.attn.proj`` but not
    ``patch_embed.proj``). ``None``: every eligible layer (LoCon's "all linears and convs"). Names under
    ``exclude`` (the classifier) are never wrapped.
    """
    def wanted(name: str) -> bool:
        if any(name == e or name.startswith(f"{e}.") for e in exclude):
            return False
        return patterns is None or any(fnmatchcase(name, p) or fnmatchcase(name, f"*.{p}") for p in patterns)

    return [name for name, module in model.named_modules() if name and lora_target(module) and wanted(name)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALayer` of ``model`` (in place) by its plain layer with the update merged in."""
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALayer)]
    for name in names:
        replace_submodule(model, name, model.get_submodule(name).merged())
    return model
