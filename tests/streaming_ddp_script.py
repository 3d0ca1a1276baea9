"""Run by tests/test_streaming.py as a script: Lightning re-executes it once per DDP rank (gloo on CPU).

Trains ClassificationModule through the streaming back-end on an ImageFolder and records, per rank and epoch, the
source index of every training sample the rank's steps saw; ``--save-at`` saves ``step.ckpt`` after that many
training steps (inside the epoch), ``--resume`` continues from such a checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl

from datamodules.base import BatchTransform, ImageDataModule
from datamodules.streaming_loader import StreamingLoader
from modules.classification import ClassificationModule
from modules.components.checkpoints import allowlisted
from modules.components.optim import OptimConfig


class WithIndex(BatchTransform):
    yields_index = True

    def __call__(self, datamodule, batch, training):
        return datamodule.prepare_batch(batch)


class SeenIds(pl.Callback):
    """Per epoch, the indices of the samples each training step got (``on_train_epoch_start`` does not run for the
    epoch a run resumes inside)."""

    def __init__(self):
        self.ids: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())


class SaveAt(pl.Callback):
    """A checkpoint after ``step`` training steps, as ModelCheckpoint(every_n_train_steps) saves one."""

    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    pl.seed_everything(0)
    data = ImageDataModule(loader=StreamingLoader(cache_dir=args.cache, shard_bytes=1500), batches=WithIndex(),
                           source=args.source, image_size=16, batch_size=4, num_workers=1, val_fraction=0.25)
    model = ClassificationModule("test_vit", num_classes=data.num_classes, image_size=16, label_smoothing=0.0,
                                 backbone_kwargs={"patch_size": 4, "depth": 1},
                                 optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, warmup_epochs=0))
    seen, out = SeenIds(), Path(args.out)
    callbacks = [seen] + ([SaveAt(args.save_at, out / "step.ckpt")] if args.save_at else [])
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp", max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=callbacks, default_root_dir=args.out)
    with allowlisted():  # the checkpoint's hyper-parameters hold an OptimConfig (weights_only=True)
        trainer.fit(model, data, ckpt_path=args.resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"ids": seen.ids}))


if __name__ == "__main__":
    main()
