"""DiffFit (Xie et al. 2023): parameter-efficient fine-tuning of a pretrained DiT.

Only the biases, the norms' affine parameters, the class embedding and new per-channel scale factors gamma train.
The gammas (init 1, so the fine-tuned model starts as the pretrained one) scale the attention and MLP residual
branches of a range of blocks: by default the first half, as the public re-implementation and the paper's
ablation ("blocks 1-14 of 28" of DiT-XL/2) place them.
"""

from __future__ import annotations

import torch
from torch import nn

from modules.components.errors import ConfigError

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class DiffFit:
    """The DiffFit recipe, applied to a denoiser whose ``blocks`` have ``gamma_attn`` / ``gamma_mlp`` slots (DiT).

    Args:
        first_block: index of the first block that gets scale factors.
        last_block: index one past the last such block; ``None`` is half the depth (the reference's placement).
        class_embedding: name prefix of the class embedding, trained in full (new classes need new rows).
    """

    def __init__(self, first_block: int = 0, last_block: int | None = None, class_embedding: str = "y_embedder"):
        self.first_block, self.last_block, self.class_embedding = first_block, last_block, class_embedding

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

    def parameter_names(self, denoiser: nn.Module) -> list[str]:
        """The trainable set: every bias, norm parameters, the class embedding, the gammas."""
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
