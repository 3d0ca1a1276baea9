"""Run by tests/test_fsdp.py: a tiny ViT classifier, 2 CPU ranks, DDP or FSDP2 (ModelParallelStrategy).

Writes ``weights.pt`` (full, unsharded tensors, rank 0) and ``global_step.txt``; with ``--save`` also a
sharded checkpoint folder, with ``--resume`` it resumes from one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from modules.classification import ClassificationModule
from modules.components.checkpoints import allowlisted
from modules.components.optim import OptimConfig


class StopAt(pl.Callback):
    """Stop at a step of a longer run (an interruption): the lr schedule still spans ``--steps``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--stop-at", type=int, default=None, help="stop early (same schedule as --steps)")
    parser.add_argument("--save", default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    pl.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 16, 16, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    # SGD: the update is linear in the gradient, so the two strategies' reduction orders stay at float rounding.
    model = ClassificationModule("vit_tiny_patch16_224", num_classes=10, image_size=16, label_smoothing=0.0,
                                 backbone_kwargs={"patch_size": 4, "depth": 2},
                                 optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, warmup_epochs=0, weight_decay=0.0))
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if args.strategy == "fsdp" else "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, max_epochs=-1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, default_root_dir=args.out,
                         callbacks=[StopAt(args.stop_at)] if args.stop_at else [])
    with allowlisted():  # the checkpoint's hyper-parameters hold an OptimConfig (weights_only=True loading)
        trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}  # DTensor shards gathered on every rank
    sharded = [k for k, v in model.state_dict().items() if hasattr(v, "full_tensor")]
    if trainer.is_global_zero:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": full, "sharded": sharded, "global_step": trainer.global_step}, out / "weights.pt")


if __name__ == "__main__":
    main()
