"""Backbone factory: every technique builds its networks through `create_backbone`."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from torch import nn

from modules.components.errors import ConfigError


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def create_backbone(
    name: str,
    num_classes: int = 0,
    image_size: int | None = None,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised timm model by name (never downloads weights).

    Args:
        name: any name from `timm.list_models()`, e.g. ``resnet18`` or ``vit_tiny_patch16_224``.
        num_classes: classifier outputs; 0 gives a headless feature extractor.
        image_size: passed as ``img_size`` to architectures that take it (ViT, Swin, ...).
        in_chans: input channels.
        **kwargs: forwarded to ``timm.create_model`` (``drop_path_rate``, ``depth``, ...).
    """
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model '{name}'{_suggest(name)}: pick a name from timm.list_models()")
    kwargs.pop("pretrained", None)
    args = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=image_size, **args)
        except TypeError as err:  # architecture has a fixed/implicit input size (CNNs)
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **args)


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load every weight or fail with the mismatching names listed (never a silent partial load)."""
    result = module.load_state_dict(state_dict, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {sorted(result.missing_keys)[:8]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {sorted(result.unexpected_keys)[:8]}")
    if problems:
        raise ConfigError(f"{what} does not match the model: {'; '.join(problems)}")
