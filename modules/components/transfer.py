"""One way to start a network from a checkpoint: rebuild its architecture, load its weights, pick a head policy.

Every technique that loads a trained backbone (fine-tuning, linear probe, PEFT, KD teachers, MR-MAE
teachers, the Frechet feature classifier) goes through :func:`build_from_checkpoint`. The architecture is
read from the checkpoint's ``hyper_parameters`` (``backbone``/``student``, ``backbone_kwargs``/
``student_kwargs``, ``image_size``, ``num_classes``), so a transfer config names only what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modules.components.backbones import create_backbone, load_state_dict_strict
from modules.components.checkpoints import backbone_state_dict, load_checkpoint
from modules.components.errors import ConfigError

Head = Literal["keep", "replace", "drop"]
HEADS = ("keep", "replace", "drop")
PRETRAINED_KEYS = ("pretrained", "pretrained_file", "pretrained_layout")


@dataclass
class Architecture:
    """What ``create_backbone`` needs to rebuild a checkpoint's network."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    num_classes: int | None = None


def unwrap_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen backbone inside a PEFT state dict, under the plain timm names (SSF/adapter/LoRA tensors dropped).

    Lets a PEFT run's checkpoint serve as ``init_checkpoint``: its wrapped ops keep the original weights (LoRA and
    DoRA updates are not merged in: the frozen backbone is what another task starts from).
    """
    plain = {}
    for name, value in state.items():
        parts = name.split(".")
        if "adapter" in parts or "lora" in parts or parts[-1] in ("ssf_scale", "ssf_shift", "lora_magnitude"):
            continue
        plain[".".join(p for p in parts if p != "inner")] = value
    return plain


def checkpoint_architecture(path: str | Path, what: str = "checkpoint", name: str | None = None,
                            kwargs: dict | None = None, ckpt: dict | None = None) -> Architecture:
    """The architecture recorded in a visionlab checkpoint, with ``name``/``kwargs`` given here winning.

    ``kwargs`` are merged over the recorded ones (e.g. a fine-tune's ``drop_path_rate`` or ``global_pool``).
    A plain state dict records nothing, so it needs ``name`` (and the kwargs it was built with). ``ckpt``: the
    file's contents, when already read.
    """
    hparams = (load_checkpoint(path, what) if ckpt is None else ckpt).get("hyper_parameters") or {}
    recorded = hparams.get("backbone") or hparams.get("student")  # a classifier's / technique's, or a KD student's
    recorded_kwargs = hparams.get("backbone_kwargs") or hparams.get("student_kwargs") or {}
    if name is None and not isinstance(recorded, str):
        raise ConfigError(f"{what} {path} records no backbone architecture (a plain state dict?): "
                          "name the backbone (model backbone and backbone_kwargs) it was trained with")
    if name is not None and isinstance(recorded, str) and name != recorded:
        recorded_kwargs = {}  # another architecture asked for explicitly: the recorded settings do not apply
    # the checkpoint already holds the weights: its own starting point (a pretrained file) is not re-read
    recorded_kwargs = {k: v for k, v in recorded_kwargs.items() if k not in PRETRAINED_KEYS}
    size = hparams.get("image_size")
    return Architecture(name or recorded, {**recorded_kwargs, **(kwargs or {})},
                        size if isinstance(size, int) else None, hparams.get("num_classes"))


def load_backbone_weights(model: nn.Module, path: str | Path, head: Head = "replace", what: str = "checkpoint",
                          ckpt: dict | None = None) -> None:
    """Load a checkpoint's ``backbone.*`` weights into ``model`` strictly, resampling position/patch embeddings.

    ``head``: ``keep`` loads the classifier as well (same class count required); ``replace`` keeps the
    model's fresh classifier where the checkpoint's has another shape or is absent; ``drop`` ignores the
    checkpoint's classifier (for a headless ``model``). A PEFT run's checkpoint loads as its plain backbone.
    ``ckpt``: the file's contents, when already read.
    """
    if head not in HEADS:
        raise ConfigError(f"head {head!r}: use one of {', '.join(HEADS)}")
    state = unwrap_state_dict(backbone_state_dict(path, ckpt=ckpt))
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    prefixes = tuple(f"{c}." for c in (classifier if isinstance(classifier, (list, tuple)) else (classifier,)))
    if head == "drop":
        state = {k: v for k, v in state.items() if k in own or not k.startswith(prefixes)}
    elif head == "replace":
        state = {k: v for k, v in state.items() if not (k.startswith(prefixes) and (k not in own or own[k].shape != v.shape))}
        state.update({k: v for k, v in own.items() if k.startswith(prefixes) and k not in state})
    load_state_dict_strict(model, state, f"{what} {path}")


def build_from_checkpoint(path: str | Path, head: Head = "replace", num_classes: int | None = None,
                          image_size: int | None = None, backbone: str | None = None,
                          backbone_kwargs: dict | None = None, what: str = "checkpoint",
                          ckpt: dict | None = None) -> tuple[nn.Module, Architecture]:
    """Rebuild a checkpoint's backbone and load its weights.

    Args:
        path: a visionlab ``.ckpt`` (or a plain state dict, with ``backbone`` given).
        head: ``keep`` (the checkpoint's classifier; ``num_classes``, if given, must equal its class count),
            ``replace`` (a fresh classifier of ``num_classes`` when the count differs) or ``drop`` (headless).
        num_classes: classes of the new task (``replace``); default: the checkpoint's.
        image_size: build at this resolution (ViT position embeddings resampled); default: the checkpoint's.
        backbone: a timm name overriding (or, for a plain state dict, supplying) the recorded one.
        backbone_kwargs: merged over the recorded ``backbone_kwargs``.
        what: how errors name the file.
        ckpt: the file's contents when the caller has read them already (the file is read once).

    Returns:
        The timm model with the checkpoint's weights, in train mode (freezing is the caller's choice), and the
        architecture it was built with (what a module records in its own hyper-parameters).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist: train that run first (visionlab fit) or fix the path")
    ckpt = load_checkpoint(path, what) if ckpt is None else ckpt
    arch = checkpoint_architecture(path, what, backbone, backbone_kwargs, ckpt)
    if head == "keep" and num_classes is not None and arch.num_classes not in (None, num_classes):
        raise ConfigError(f"{what} {path} predicts {arch.num_classes} classes but {num_classes} are needed: "
                          "use a checkpoint trained on the same classes")
    classes = 0 if head == "drop" else num_classes if num_classes is not None else arch.num_classes
    if classes is None:
        raise ConfigError(f"{what} {path} records no class count: set num_classes")
    model = create_backbone(arch.name, num_classes=classes, image_size=image_size or arch.image_size, **arch.kwargs)
    load_backbone_weights(model, path, head, what, ckpt)
    return model, arch
