"""Reading weights out of visionlab (Lightning) checkpoints without importing any technique."""

from __future__ import annotations

from pathlib import Path

import torch

from modules.components.errors import ConfigError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, or the file itself if it is a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass the path of a .ckpt written by visionlab fit")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated / not a torch file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}): it is corrupt or not a checkpoint") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds no state_dict")
    return state


def backbone_state_dict(path: str | Path, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Weights under ``prefix`` (prefix stripped); a plain state dict without the prefix is returned whole."""
    state = read_state_dict(path)
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if picked:
        return picked
    if any(k.startswith(("model.", "teacher.", "decoder.")) for k in state):
        raise ConfigError(f"checkpoint {path} has no '{prefix}*' weights; its keys start with {sorted({k.split('.')[0] for k in state})}")
    return state
