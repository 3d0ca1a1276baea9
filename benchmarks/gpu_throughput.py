"""Images/s and step time of visionlab modules on whatever accelerator is present, FFCV-fed vs synthetic-fed.

Each module trains through a real Lightning ``fit`` (bf16 mixed precision on GPU). "synthetic" feeds uint8
batches already in memory (no decode, no augmentation); "ffcv" feeds the FFCV DataModule from a JPEG
``.beton`` (Fashion-MNIST upscaled to ImageNet-like sizes). The gap between the two is the data-loading
overhead the accelerator sees.

    python benchmarks/gpu_throughput.py            # GPU: ViT-B/16 at 224 px, batch 128; CPU: tiny sizes
    python benchmarks/gpu_throughput.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from dataloading import write_jpeg_tree  # benchmarks/dataloading.py
from datamodules.ffcv_datamodule import FFCVDataModule
from modules.classification import ClassificationModule
from modules.components.optim import OptimConfig
from modules.mae import MAEModule


class _Synthetic(Dataset):
    def __init__(self, size: int, count: int, num_classes: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, num_classes, (count,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


class SyntheticDataModule(FFCVDataModule):
    """Same normalisation path as the FFCV DataModule, batches from memory (no decoding at all)."""

    def __init__(self, count: int, **kwargs):
        super().__init__(**kwargs)
        self.count = count

    def prepare_data(self):
        pass

    def setup(self, stage):
        pass

    def train_dataloader(self):
        return DataLoader(_Synthetic(self.image_size, self.count, self.num_classes), batch_size=self.batch_size,
                          shuffle=True, drop_last=True, num_workers=0, pin_memory=torch.cuda.is_available())


class Timer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def modules(gpu: bool, size: int):
    vit = "vit_base_patch16_224" if gpu else "vit_tiny_patch16_224"
    vit_kwargs = {} if gpu else {"patch_size": 8, "depth": 4}
    optim = OptimConfig(name="adamw", lr=1e-4, warmup_epochs=0)
    return {
        f"classification[{vit}]": lambda: ClassificationModule(vit, num_classes=10, image_size=size,
                                                               backbone_kwargs=vit_kwargs, optim=optim),
        f"mae[{vit}, 75% masked]": lambda: MAEModule(vit, num_classes=10, image_size=size, backbone_kwargs=vit_kwargs,
                                                    log_images_every_n_steps=10**9, optim=optim),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "visionlab-bench-data")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    size = 224 if gpu else 64
    batch = (128 if not args.quick else 64) if gpu else 16
    steps, warmup = (30, 10) if args.quick else (100, 20)
    if not gpu:
        steps, warmup = (6, 2) if args.quick else (12, 3)
    workers = args.workers or (8 if gpu else 2)
    count = int(batch * (steps + warmup + 2) / 0.85)  # 10% goes to the (unused) val split
    tree = write_jpeg_tree(args.workdir, count, 256 if gpu else 80)
    data_args = dict(source=str(tree), image_size=size, batch_size=batch, num_workers=workers, val_fraction=0.1)

    rows = []
    for name, build in modules(gpu, size).items():
        for feed in ("synthetic", "ffcv"):
            if feed == "ffcv":
                data = FFCVDataModule(cache_dir=str(args.workdir / "beton"), write_mode="jpg",
                                      max_resolution=256 if gpu else 80, **data_args)
            else:
                data = SyntheticDataModule(count=count, **data_args)
            timer = Timer(warmup)
            trainer = pl.Trainer(accelerator="auto", devices=1, precision="bf16-mixed" if gpu else "32-true",
                                 max_epochs=1, limit_train_batches=steps + warmup,
                                 limit_val_batches=0, logger=False, enable_checkpointing=False,
                                 enable_model_summary=False, enable_progress_bar=False, callbacks=[timer])
            torch.manual_seed(0)
            trainer.fit(build(), data)
            timed = trainer.global_step - warmup
            rows.append((name, feed, timed * batch / timer.seconds, timer.seconds / timed * 1000))

    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ngpu_throughput on {device}: {size}px, batch {batch}, {'bf16-mixed' if gpu else 'fp32'}, "
          f"{workers} loader workers")
    print(f"{'module':<40} {'feed':<10} {'images/s':>10} {'ms/step':>9}")
    for name, feed, rate, ms in rows:
        print(f"{name:<40} {feed:<10} {rate:>10.1f} {ms:>9.1f}")
    for name in dict.fromkeys(r[0] for r in rows):
        synthetic, ffcv = (r[2] for r in rows if r[0] == name)
        print(f"{name} ffcv_vs_synthetic: {ffcv / synthetic:.2f}x")


if __name__ == "__main__":
    main()
