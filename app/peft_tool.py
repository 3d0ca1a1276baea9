"""``visionlab peft``: export a PEFT checkpoint's task file, or rebuild a model from one.

    visionlab peft export --checkpoint runs/peft/ssf/checkpoints/last.ckpt --out task.pt
    visionlab peft load --task task.pt [--init-checkpoint backbone.ckpt] [--out model.pt]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from modules.components.checkpoints import allowlisted, checkpoint_hparams
from modules.components.errors import ConfigError
from modules.components.files import write_atomic
from modules.peft import PEFTModule, load_task_file


def export(checkpoint: str, out: str) -> str:
    """Write the task file of a PEFT checkpoint; returns the line to print."""
    if "method" not in checkpoint_hparams(checkpoint):
        raise ConfigError(f"{checkpoint} is not a PEFT checkpoint: pass one written with configs/peft/*.yaml")
    with warnings.catch_warnings(), allowlisted():
        warnings.simplefilter("ignore")
        model = PEFTModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    size = model.export_task_file(out)
    return f"peft: wrote {out} ({size} bytes; {type(model.method).__name__}, {model.task_bytes()} bytes of task parameters)"


def load(task: str, init_checkpoint: str | None, out: str | None) -> list[str]:
    """Rebuild backbone + task file; optionally save its state dict (a plain timm one where the method merges)."""
    model = load_task_file(task, init_checkpoint)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"peft: rebuilt {model.hparams.backbone} + {task} ({type(model.method).__name__}, {trainable} task parameters)"]
    if out:
        try:
            state, kind = model.merged_backbone().state_dict(), "plain timm"
        except ConfigError:
            state, kind = model.state_dict(), "PEFTModule"
        write_atomic(out, lambda tmp: torch.save(state, tmp))
        lines.append(f"peft: saved {kind} state dict to {out}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """``visionlab peft export|load ...`` (``argv`` without the tool name)."""
    parser = argparse.ArgumentParser(prog="visionlab peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exporting = sub.add_parser("export", help="write the task-specific parameters of a PEFT checkpoint")
    exporting.add_argument("--checkpoint", required=True, help="a .ckpt written by visionlab fit with configs/peft/*.yaml")
    exporting.add_argument("--out", required=True, help="task file to write")
    loading = sub.add_parser("load", help="rebuild backbone + task file into a working model")
    loading.add_argument("--task", required=True, help="task file written by export")
    loading.add_argument("--init-checkpoint", default=None, help="backbone checkpoint (default: the one recorded in the task file)")
    loading.add_argument("--out", default=None, help="save the rebuilt model's state dict here (merging methods: a plain timm state dict)")
    args = parser.parse_args(argv)
    # user errors (VisionlabError) propagate to app/cli.py's one error path: one line, exit code 2
    lines = [export(args.checkpoint, args.out)] if args.command == "export" else load(args.task, args.init_checkpoint, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
