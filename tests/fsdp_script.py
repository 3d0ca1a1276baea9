"""Run by tests/test_fsdp.py under ``torchrun --nproc-per-node 2``: a tiny ViT classifier on 2 CPU ranks (gloo).

One launch runs the phases one after the other in the same two processes (one process group; Lightning reuses
it), each from the same seed:

* ``ddp``: ``--steps`` SGD steps under DDP;
* ``fsdp``: the same under FSDP2 (``ModelParallelStrategy``), saving a sharded checkpoint after step
  ``--save-at`` on the way (what a pre-emption saves), without stopping;
* ``resume``: a fresh model and trainer resuming from that checkpoint up to ``--steps``.

Each phase writes ``<out>/<phase>.pt`` (rank 0): the full (unsharded) weights, the sharded keys, the global step
and the learning rate of every step (``lrs``); ``fsdp`` also ``<out>/at_save.pt``, the weights it saved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader

from modules.classification import ClassificationModule
from modules.components.checkpoints import allowlisted
from modules.components.optim import OptimConfig


def full_weights(module) -> dict[str, torch.Tensor]:
    """Unsharded copies of ``module``'s state (collective under FSDP2: every rank gathers the DTensor shards)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in module.state_dict().items()}


class SaveAt(pl.Callback):
    """Save a checkpoint after optimizer step ``step`` and carry on (every rank calls it: it is collective);
    rank 0 also writes the weights at that point to ``at_save.pt``."""

    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path / "sharded.ckpt")
            weights = full_weights(pl_module)
            if trainer.is_global_zero:
                torch.save(weights, self.path / "at_save.pt")


class RecordLR(pl.Callback):
    """The learning rate each optimizer step used (read before the step), by global step."""

    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = float(optimizer.param_groups[0]["lr"])


def run(phase: str, args, out: Path) -> None:
    pl.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 16, 16, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    data = [{"image": images[i], "label": labels[i]} for i in range(64)]  # batches by name
    # SGD: the update is linear in the gradient, so the two strategies' reduction orders stay at float rounding.
    model = ClassificationModule("vit_tiny_patch16_224", num_classes=10, image_size=16, label_smoothing=0.0,
                                 backbone_kwargs={"patch_size": 4, "depth": 2},
                                 optim=OptimConfig(name="sgd", lr=0.05, momentum=args.momentum, warmup_epochs=0,
                                                   weight_decay=0.0))
    strategy = (DDPStrategy(process_group_backend="gloo") if phase == "ddp"
                else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    shards = str(out / "sharded.ckpt")
    record = RecordLR()
    callbacks = [record, *([SaveAt(args.save_at, out)] if phase == "fsdp" else [])]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, max_epochs=-1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(out / phase),
                         callbacks=callbacks)
    with allowlisted():  # the checkpoint's hyper-parameters hold an OptimConfig (weights_only=True loading)
        trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=shards if phase == "resume" else None)
    full = full_weights(model)
    if trainer.is_global_zero:
        torch.save({"weights": full, "sharded": [k for k, v in model.state_dict().items() if hasattr(v, "full_tensor")],
                    "global_step": trainer.global_step, "lrs": record.lrs}, out / f"{phase}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phases", default="ddp,fsdp,resume")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=4)
    parser.add_argument("--momentum", type=float, default=0.9)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for phase in args.phases.split(","):
        run(phase, args, out)
    # Leave together and tear the gloo group down before interpreter exit: once (1 suite run in ~10) rank 1
    # aborted at exit ("terminate called without an active exception") while rank 0 was still writing its file.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
