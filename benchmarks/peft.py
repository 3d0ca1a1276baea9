"""Parameter-efficient transfer at small scale on the embedded Fashion-MNIST (32 px).

Pretrain a ViT (dim 192, depth 6, 8-px patches) with ``ClassificationModule`` on classes 0-4, then
transfer the checkpoint to classes 5-9 (a few thousand labelled images) with ``PEFTModule``: linear
probe, full fine-tune, SSF, AdaptFormer adapter, 1-bit adapter and hierarchical side-tuning. Prints top-1
on the classes-5-9 test images, trainable parameters (% of the model), the task-specific storage at the
stated bits, the exported task-file size and the median training-step time.

    python benchmarks/peft.py --quick   # ~2 min on 2 cores
    python benchmarks/peft.py           # ~10-15 min on 2 cores
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from datamodules.base import loader_batch
from datamodules.ffcv_datamodule import FFCVDataModule
from datamodules.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from modules.classification import ClassificationModule
from modules.components.optim import OptimConfig
from modules.components.low_bit import NormalQuantile, UniformGrid, relative_error
from modules.components.peft_methods import (
    AdapterTuning,
    FullFineTune,
    LinearProbe,
    SideTuning,
    SSFTuning,
)
from modules.peft import PEFTModule, load_task_file

BACKBONE = "vit_tiny_patch16_224"
VIT = {"patch_size": 8, "depth": 6}  # dim 192, 3 heads: 2.7M parameters, 16 tokens at 32 px
DATA = dict(source="fashion_mnist", image_size=32, num_workers=2, rrc_scale=(0.6, 1.0), val_crop_ratio=1.0,
            mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
PRETRAIN_CLASSES, TRANSFER_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

# name -> PEFTModule arguments, as configs/peft/<name>.yaml (lr per method as the papers tune it: higher for
# the few new parameters)
VARIANTS = {
    "linear_probe": dict(method=LinearProbe(), optim=OptimConfig(lr=1e-2, weight_decay=0.0)),
    "full": dict(method=FullFineTune(), optim=OptimConfig(lr=5e-4, weight_decay=0.05)),
    "ssf": dict(method=SSFTuning(init_std=0.02), optim=OptimConfig(lr=1e-2, weight_decay=0.0)),
    "adapter": dict(method=AdapterTuning(dim=8, scale=0.1), optim=OptimConfig(lr=5e-3, weight_decay=0.0)),
    # 1-bit weights store 32x smaller, so the bottleneck doubles (still < 2% trainable); sign flips of the
    # latent STE weights need a larger lr
    "adapter_1bit": dict(method=AdapterTuning(dim=16, scale=1.0, bias=False, quantizer=NormalQuantile(1)),
                         optim=OptimConfig(lr=2e-2, weight_decay=0.0)),
    "side": dict(method=SideTuning(dim=32, taps=3), optim=OptimConfig(lr=5e-3, weight_decay=0.0)),
}


def quantizer_errors() -> None:
    """Relative error ||Q(W) - W|| / ||W|| of both quantizers on an 8x192 down-projection, per bit width."""
    weights = {"gaussian": torch.randn(8, 192, generator=torch.Generator().manual_seed(0))}
    torch.manual_seed(0)
    weights["nn.Linear init"] = torch.nn.Linear(192, 8).weight.detach()  # uniform +-1/sqrt(192)
    print(f"{'8x192 weight':<16}{'bits':>5}{'normal-quantile':>17}{'uniform per-row':>17}")
    for name, weight in weights.items():
        for bits in (1, 2, 4):
            print(f"{name:<16}{bits:>5}{relative_error(NormalQuantile(bits), weight):>17.3f}"
                  f"{relative_error(UniformGrid(bits), weight):>17.3f}")
    print()


class StepTimer(pl.Callback):
    """Wall time of each training step (forward, backward, optimizer), median over steps after warm-up."""

    def __init__(self, skip: int = 3):
        self.skip, self.times, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times) if self.times else float("nan")


def trainer(root: Path, epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs, default_root_dir=root, callbacks=list(callbacks),
    )


def data(root: Path, classes: list[int], train_limit: int, val_limit: int | None, batch_size: int) -> FFCVDataModule:
    return FFCVDataModule(cache_dir=str(root / "beton"), classes=classes, train_limit=train_limit,
                          val_limit=val_limit, batch_size=batch_size, **DATA)


def pretrain(root: Path, args) -> tuple[Path, float]:
    pl.seed_everything(0, verbose=False)
    model = ClassificationModule(
        backbone=BACKBONE, num_classes=len(PRETRAIN_CLASSES), image_size=32, backbone_kwargs=VIT, label_smoothing=0.1,
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=0.5),
    )
    run = trainer(root / "pretrain", args.pretrain_epochs)
    run.fit(model, datamodule=data(root, PRETRAIN_CLASSES, args.pretrain_images, args.val_images, 128))
    path = root / "pretrain.ckpt"
    run.save_checkpoint(path)
    return path, float(run.callback_metrics["val/acc1"])


def transfer(root: Path, name: str, checkpoint: Path, args) -> dict:
    pl.seed_everything(0, verbose=False)
    options = dict(VARIANTS[name])
    options["optim"].warmup_epochs = 0.5
    model = PEFTModule(backbone=BACKBONE, backbone_kwargs=VIT, num_classes=len(TRANSFER_CLASSES), image_size=32,
                       init_checkpoint=str(checkpoint), **options)
    timer = StepTimer()
    run = trainer(root / name, args.epochs, [timer])
    dm = data(root, TRANSFER_CLASSES, args.images, args.val_images, 64)
    run.fit(model, datamodule=dm)
    acc = float(run.callback_metrics["val/acc1"])
    task_file = root / f"{name}.task.pt"
    file_bytes = model.export_task_file(task_file)
    reloaded = load_task_file(task_file)  # the exported file alone + the backbone checkpoint must reproduce the model
    images = loader_batch(next(iter(dm.val_dataloader())))["image"][:16]
    images = dm.normalize(images) if images.dtype == torch.uint8 else images
    with torch.no_grad():
        round_trip = torch.allclose(reloaded(images), model.eval()(images), atol=1e-5)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(name=name, acc=acc, trainable=trainable, pct=100 * trainable / total, task_bytes=model.task_bytes(),
                file_bytes=file_bytes, step_ms=timer.median_ms, round_trip=round_trip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budget (~2 min)")
    parser.add_argument("--root", default="runs/bench/peft", help="run folder (checkpoints, task files, .beton cache)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if args.quick:
        args.pretrain_images, args.pretrain_epochs, args.images, args.epochs, args.val_images = 4000, 2, 1000, 3, 1000
    else:
        args.pretrain_images, args.pretrain_epochs, args.images, args.epochs, args.val_images = 15000, 4, 2500, 8, None
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    quantizer_errors()
    start = time.time()
    checkpoint, pretrain_acc = pretrain(root, args)
    print(f"pretrain: {BACKBONE} {VIT} on classes {PRETRAIN_CLASSES}, {args.pretrain_images} images x "
          f"{args.pretrain_epochs} epochs: val top-1 {pretrain_acc:.4f} ({time.time() - start:.0f} s)")
    rows = [transfer(root, name, checkpoint, args) for name in args.variants]

    print(f"\ntransfer to classes {TRANSFER_CLASSES}: {args.images} train images x {args.epochs} epochs, "
          f"top-1 on {'all' if args.val_images is None else args.val_images} test images of those classes")
    print(f"{'variant':<14}{'top-1':>8}{'trainable':>11}{'params %':>10}{'task bytes':>12}{'file bytes':>12}{'step ms':>9}  reload")
    for r in rows:
        print(f"{r['name']:<14}{r['acc']:>8.4f}{r['trainable']:>11,}{r['pct']:>9.2f}%{r['task_bytes']:>12,}"
              f"{r['file_bytes']:>12,}{r['step_ms']:>9.1f}  {'identical' if r['round_trip'] else 'DIFFERS'}")
    by = {r["name"]: r for r in rows}
    if "full" in by:
        print()
        for r in rows:
            if r["name"] != "full":
                print(f"{r['name']}: step time vs full {by['full']['step_ms'] / r['step_ms']:.2f}x, "
                      f"task file vs full {by['full']['file_bytes'] / r['file_bytes']:.2f}x smaller")
    if {"linear_probe", "full"} <= by.keys():
        lo, hi = by["linear_probe"]["acc"], by["full"]["acc"]
        print(f"\ndirection (SSF / adapters >= linear probe {lo:.4f}, toward full FT {hi:.4f}, < 2% params):")
        for name in ("ssf", "adapter", "adapter_1bit"):
            if name in by:
                r = by[name]
                ok = r["acc"] >= lo and r["pct"] < 2
                where = "below linear probe" if r["acc"] < lo else "at/above full FT" if r["acc"] >= hi else "between"
                print(f"  {name}: {r['acc']:.4f} ({where}), {r['pct']:.2f}% params -> {'holds' if ok else 'FAILS'}")
    if args.quick:
        print("(--quick is a smoke run: a few dozen steps on a weak backbone; judge the direction on the full run)")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
