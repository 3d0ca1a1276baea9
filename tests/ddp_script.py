"""Run by tests/test_ddp.py as a script: Lightning re-executes it once per DDP rank.

Trains ClassificationModule on an FFCV ImageFolder whose every class holds one image (so a label is a
sample id), records the ids each rank sees, the synced val/acc1 on each rank, and the final weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules.base import ImageDataModule
from datamodules.ffcv_loader import FFCVLoader
from modules.classification import ClassificationModule
from modules.components.optim import OptimConfig


class SeenIds(pl.Callback):
    def __init__(self):
        self.ids: list[list[int]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.ids.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids[-1] += batch["label"].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--order", default="sequential")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    pl.seed_everything(0)
    data = ImageDataModule(loader=FFCVLoader(cache_dir=args.cache, order=args.order), source=args.source, image_size=16,
                           batch_size=args.batch_size, num_workers=1, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0),
                           hflip=False, val_crop_ratio=1.0)
    model = ClassificationModule("test_vit", num_classes=data.num_classes, image_size=16, label_smoothing=0.0,
                                 backbone_kwargs={"patch_size": 4},
                                 # SGD: the update is linear in the gradient, so DDP's different reduction order
                                 # stays at float32 rounding in the weights; Adam's m / sqrt(v) turns that noise
                                 # on near-zero gradients (zero-initialised biases) into lr-sized steps.
                                 optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, warmup_epochs=0))
    out = Path(args.out)
    if args.devices == 1:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "initial.pt")  # the weights before training, for the test
    seen = SeenIds()
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[seen], default_root_dir=args.out)
    trainer.fit(model, data)
    out.mkdir(parents=True, exist_ok=True)
    record = {"ids": seen.ids, "val_acc1": float(trainer.callback_metrics["val/acc1"]),
              "world_size": trainer.world_size, "global_step": trainer.global_step,
              "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    trainer.save_checkpoint(out / "final.ckpt")  # rank 0 writes


if __name__ == "__main__":
    main()
