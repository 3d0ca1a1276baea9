"""The PEFT task-file format: what one fine-tuned task adds to a shared frozen backbone (no Lightning).

A task file is a ``torch.save`` of a dict with only tensors, containers and primitives (read back with
``weights_only=True``)::

    {"format": "visionlab-peft-task/2",
     "config": {...},          # the PEFT module's arguments; "method" as {class_path, init_args}
     "params": {name: tensor}, # trained fp32 tensors (full fine-tune: the whole backbone incl. buffers)
     "quantized": {module name: {"bits", "shape", "codes": uint8 bit-packed, <decode tensors>}}}
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from modules.components.checkpoints import load_checkpoint
from modules.components.errors import ConfigError
from modules.components.files import write_atomic

TASK_FORMAT = "visionlab-peft-task/2"


def write_task_file(path: str | os.PathLike, config: dict, params: dict[str, torch.Tensor], quantized: dict[str, dict]) -> int:
    """Write a task file atomically (temporary file + rename); returns its size in bytes."""
    payload = {"format": TASK_FORMAT, "config": config, "params": params, "quantized": quantized}
    return write_atomic(Path(path), lambda tmp: torch.save(payload, tmp)).stat().st_size


def read_task_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict]]:
    """``(config, params, quantized)`` of a task file.

    Raises:
        ConfigError: missing/unreadable file, or not a task file of this format.
    """
    payload = load_checkpoint(path, "task file")
    if payload.get("format") != TASK_FORMAT:
        found = payload.get("format")
        hint = f" (format {found}: export it again with this version)" if found else ""
        raise ConfigError(f"{path} is not a visionlab PEFT task file{hint}")
    return dict(payload["config"]), payload["params"], payload["quantized"]
