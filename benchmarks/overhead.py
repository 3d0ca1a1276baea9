"""Lightning ``fit`` vs a plain PyTorch loop: same model, optimizer, schedule and batches.

The batches are real Fashion-MNIST images held in memory (no loader cost on either side). Both sides run
``--warmup`` steps first, then the mean time of the next ``--steps`` optimizer steps is compared. The
Lightning side uses ``ClassificationModule`` as a user would (metrics, logging, progress bar on).

    python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datamodules import sources
from modules.classification import ClassificationModule
from modules.components.batches import NamedTensors
from modules.components.optim import build_optimizer, build_scheduler

from harness import print_ratio


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def batches(count: int, batch_size: int, size: int) -> NamedTensors:
    data = sources.fashion_mnist("train")
    images = torch.from_numpy(data.images[: count * batch_size]).float().div(255).unsqueeze(1)
    images = F.interpolate(images, size=size, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    return NamedTensors(images, torch.from_numpy(data.labels[: count * batch_size]))


def plain_loop(model: ClassificationModule, dataset, batch_size: int, warmup: int) -> float:
    optimizer = build_optimizer(model.backbone, model.optim)
    scheduler = build_scheduler(optimizer, model.optim, len(dataset) // batch_size, len(dataset) // batch_size)
    model.train()
    start = None
    for step, batch in enumerate(DataLoader(dataset, batch_size=batch_size)):
        images, labels = batch["image"], batch["label"]
        if step == warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels, label_smoothing=model.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
    return (time.perf_counter() - start) / (len(dataset) // batch_size - warmup)


def lightning_fit(model: ClassificationModule, dataset, batch_size: int, warmup: int) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=DataLoader(dataset, batch_size=batch_size))
    return (timer.end - timer.start) / (len(dataset) // batch_size - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    warmup, steps = (5, 20) if args.quick else (10, 80)
    dataset = batches(warmup + steps, args.batch_size, args.image_size)

    results = {}
    for name, run in (("plain_pytorch", plain_loop), ("lightning", lightning_fit)):
        torch.manual_seed(0)
        model = ClassificationModule(args.backbone, num_classes=10, image_size=args.image_size)
        results[name] = run(model, dataset, args.batch_size, warmup)

    print(f"\noverhead: {args.backbone} at {args.image_size}px, batch {args.batch_size}, "
          f"{steps} timed steps after {warmup} warm-up steps, CPU {torch.get_num_threads()} threads")
    print(f"{'variant':<14} {'ms/step':>9}")
    for name, seconds in results.items():
        print(f"{name:<14} {seconds * 1000:>9.1f}")
    print_ratio("lightning_overhead", results["lightning"] / results["plain_pytorch"])


if __name__ == "__main__":
    main()
