"""Reading visionlab (Lightning) checkpoints safely, without importing any technique.

Every checkpoint the project reads goes through :func:`load_checkpoint`, which unpickles with
``torch.load(..., weights_only=True)``: tensors, containers and primitive types only, plus the project's own
hyper-parameter dataclasses listed in :data:`SAFE_TYPES`. A file whose pickle names any other global (a
function to call, a class to build) is refused with one line naming it, before anything in it runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from modules.components.errors import ConfigError


def _safe_types() -> list[type]:
    """The project's hyper-parameter types that checkpoints written from the Python API may hold."""
    from modules.components.optim import OptimConfig
    from modules.components.peft.layers import AdapterConfig, SideConfig  # legacy: hyper-parameters before the part contract

    # Checkpoints written before components were grouped by family name these types by their old modules.
    legacy = [(AdapterConfig, "modules.components.peft.AdapterConfig"), (SideConfig, "modules.components.peft.SideConfig")]
    return [OptimConfig, AdapterConfig, SideConfig, Path, type(Path()), *legacy]


def allowlisted():
    """Context manager: ``torch.load(weights_only=True)`` inside it accepts the project's own types too."""
    return torch.serialization.safe_globals(_safe_types())


def refused_pickle(what: str, err: pickle.UnpicklingError) -> ConfigError:
    """The one-line error for a pickle that ``weights_only=True`` refused (it names the global it asked for)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found is None:  # not a torch file at all (garbage, another format)
        return ConfigError(f"{what} cannot be read (UnpicklingError): it is corrupt or not a checkpoint")
    name = found.group(1)
    return ConfigError(f"{what} needs {name}, which visionlab does not load (weights_only=True): if you trust this "
                       f"file, allow it deliberately with torch.serialization.add_safe_globals([{name}]) before loading")


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """``torch.load`` of a checkpoint with ``weights_only=True`` and the project's allow-list.

    Raises:
        ConfigError: the file is missing, unreadable, or its pickle needs a type outside the allow-list
            (the message names the type and how to allow it deliberately).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist: pass the path of a .ckpt written by visionlab fit")
    try:
        with allowlisted():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused_pickle(f"{what} {path}", err) from None
    except Exception as err:  # truncated / not a torch file
        raise ConfigError(f"{what} {path} cannot be read ({type(err).__name__}): it is corrupt or not a checkpoint") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint or state dict")
    return ckpt


def checkpoint_hparams(path: str | Path, what: str = "checkpoint") -> dict:
    """The ``hyper_parameters`` a Lightning checkpoint records (empty for a plain state dict)."""
    return load_checkpoint(path, what).get("hyper_parameters") or {}


def read_state_dict(path: str | Path, ckpt: dict | None = None) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, or the file itself if it is a plain state dict.

    ``ckpt``: the file's contents when the caller has read them already (large checkpoints are read once).
    """
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds no state_dict")
    return state


def backbone_state_dict(path: str | Path, prefix: str = "backbone.", ckpt: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights under ``prefix`` (prefix stripped); a plain state dict without the prefix is returned whole."""
    state = read_state_dict(path, ckpt)
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if picked:
        return picked
    if any(k.startswith(("model.", "teacher.", "decoder.")) for k in state):
        raise ConfigError(f"checkpoint {path} has no '{prefix}*' weights; its keys start with {sorted({k.split('.')[0] for k in state})}")
    return state
