"""DiffFit (Xie et al. 2023): parameter-efficient fine-tuning of a pretrained DiT.

Only the biases, the norms' affine parameters, the class embedding and new per-channel scale factors gamma train.
The gammas (init 1, so the fine-tuned model starts as the pretrained one) sit in a range of blocks: by default the
first half, as the public re-implementation and the paper's ablation ("blocks 1-14 of 28" of DiT-XL/2) place them.

Where the gammas sit in a block (``scale_linears``). The public re-implementation (thuml/Diffusion-Tuning,
``models.py`` with ``use_gamma``; its DiffFit baseline trains every parameter named bias, norm, gamma or y_embed)
scales four outputs per block: the attention and the MLP residual branches (a ``dim`` vector each, after adaLN's
gate) and, inside the attention, the qkv projection's output (a ``3 * dim`` vector) and the output projection's
(a ``dim`` vector). That is the default here. The paper's method section could not be read with the tools of this
project (only its abstract is indexed: "fine-tunes the bias term and newly-added scaling factors in specific
layers"), so the re-implementation's code is the source the default follows. ``scale_linears=False`` keeps
visionlab's earlier layout, the two residual-branch gammas only: 4 x dim fewer scales per block, and it loads
DiffFit checkpoints trained here before.
"""

from __future__ import annotations

import torch
from torch import nn

from modules.components.parts import Part
from modules.components.errors import ConfigError

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class ScaledLinear(nn.Linear):
    """``nn.Linear`` whose output (bias included) is multiplied by a per-output-channel ``gamma_out`` (init 1).

    Built by :meth:`from_linear` around an existing layer's own weight and bias, so the state-dict keys of the
    wrapped layer stay the same (a pretrained checkpoint loads into it) and only ``<name>.gamma_out`` is new.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.gamma_out = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> ScaledLinear:
        scaled = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                     dtype=linear.weight.dtype)
        scaled.weight, scaled.bias = linear.weight, linear.bias
        scaled.gamma_out = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device,
                                                   dtype=linear.weight.dtype))
        return scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gamma_out


class DiffFit(Part):
    """The DiffFit recipe, applied to a denoiser whose ``blocks`` have ``gamma_attn`` / ``gamma_mlp`` slots (DiT).

    Args:
        first_block: index of the first block that gets scale factors.
        last_block: index one past the last such block; ``None`` is half the depth (the reference's placement).
        class_embedding: name prefix of the class embedding, trained in full (new classes need new rows).
        scale_linears: also scale the attention's qkv output (3 x dim) and output projection (dim), as the public
            re-implementation (default); ``False``: the residual-branch gammas only, visionlab's earlier layout
            (see the module docstring for which source says what).
    """

    def __init__(self, first_block: int = 0, last_block: int | None = None, class_embedding: str = "y_embedder",
                 scale_linears: bool = True):
        self.first_block, self.last_block, self.class_embedding = first_block, last_block, class_embedding
        self.scale_linears = scale_linears

    def block_range(self, depth: int) -> range:
        last = depth // 2 if self.last_block is None else self.last_block
        if not 0 <= self.first_block < last <= depth:
            raise ConfigError(f"DiffFit blocks {self.first_block}..{last} must satisfy 0 <= first_block < last_block "
                              f"<= depth ({depth})")
        return range(self.first_block, last)

    def add_scales(self, denoiser: nn.Module) -> None:
        """Give the chosen blocks per-channel gammas, initialised to 1 (before loading the pretrained weights)."""
        blocks = getattr(denoiser, "blocks", None)
        if blocks is None or not all(hasattr(block, "gamma_attn") and hasattr(block, "gamma_mlp") for block in blocks):
            raise ConfigError(f"DiffFit needs a DiT denoiser (blocks with residual scale slots), not "
                              f"{type(denoiser).__name__}")
        for index in self.block_range(len(blocks)):
            block = blocks[index]
            dim = block.norm1.normalized_shape[0]
            block.gamma_attn = nn.Parameter(torch.ones(dim))
            block.gamma_mlp = nn.Parameter(torch.ones(dim))
            if self.scale_linears:
                block.attn.qkv = ScaledLinear.from_linear(block.attn.qkv)  # (3 D,) gamma_out
                block.attn.proj = ScaledLinear.from_linear(block.attn.proj)  # (D,) gamma_out

    def parameter_names(self, denoiser: nn.Module) -> list[str]:
        """The trainable set: every bias, norm parameters, the class embedding, the gammas (``gamma_*``)."""
        names = []
        for module_name, module in denoiser.named_modules():
            for leaf, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{leaf}" if module_name else leaf
                if (leaf == "bias" or leaf.startswith("gamma_") or isinstance(module, NORM_TYPES)
                        or full.startswith(f"{self.class_embedding}.")):
                    names.append(full)
        return names

    def freeze(self, denoiser: nn.Module) -> None:
        """Freeze everything but :meth:`parameter_names` (after loading the pretrained weights)."""
        denoiser.requires_grad_(False)
        for name in self.parameter_names(denoiser):
            denoiser.get_parameter(name).requires_grad_(True)
