"""Images/s and step time of visionlab modules on whatever accelerator is present: FFCV-fed vs synthetic-fed, and the
training-speed switches (``channels_last``, ``torch.compile``) on and off.

Each module (classification, MAE, CLIP) trains through a real Lightning ``fit`` (bf16 mixed precision on GPU).
"synthetic" feeds uint8 batches already in memory (no decode, no augmentation); "ffcv" feeds the FFCV back-end
from a JPEG ``.beton`` (Fashion-MNIST upscaled to ImageNet-like sizes). The gap between the two is the data-loading
overhead the accelerator sees. The switches are the YAML callbacks of ``callbacks/speed.py`` (``ChannelsLast``,
``CompileNetwork``), applied to the synthetic feed; compiled runs are timed after their warm-up steps, which pay
the compilation. ``channels_last`` acts on one network of the module (``backbone``; CLIP's ``model``, the two
towers). ``compile`` compiles the network a classifier calls whole; MAE and CLIP run their ViT's steps one by one,
so there it compiles each of the ViT's blocks (``CompileNetwork(blocks=True)``; CLIP: the image tower's), as
``configs/callbacks/compile.yaml`` says to.

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
from callbacks.speed import ChannelsLast, CompileNetwork
from datamodules.backend import LoaderBackend
from datamodules.base import ImageDataModule
from datamodules.captions import ClassPrompts
from datamodules.ffcv_loader import FFCVLoader
from modules.classification import ClassificationModule
from modules.clip import CLIPModule
from modules.components.optim import OptimConfig
from modules.mae import MAEModule

from harness import print_ratio, print_ratios

SWITCHES = {  # name -> callbacks of callbacks/speed.py, given the network attribute and CompileNetwork's arguments
    "channels_last": lambda network, compiled: [ChannelsLast(network)],
    "compile": lambda network, compiled: [CompileNetwork(**compiled)],
    "channels_last+compile": lambda network, compiled: [ChannelsLast(network), CompileNetwork(**compiled)],
}


class _Synthetic(Dataset):
    def __init__(self, size: int, count: int, num_classes: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, num_classes, (count,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


class SyntheticLoader(LoaderBackend):
    """A loader back-end serving uint8 batches from memory (no decoding at all): the DataModule's device-side
    normalisation and batch transform (class-prompt captions for CLIP) stay the same as with FFCV."""

    def __init__(self, count: int):
        self.count = count

    def split_loader(self, split, train, indices=None):
        dm = self.datamodule
        return DataLoader(_Synthetic(dm.image_size, self.count, dm.num_classes), batch_size=dm.batch_size,
                          shuffle=train, drop_last=train, num_workers=0, pin_memory=torch.cuda.is_available())


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


def modules(gpu: bool, size: int, context_length: int):
    """name -> (builder, the network attribute channels_last acts on, CompileNetwork's arguments, captioned data)."""
    vit = "vit_base_patch16_224" if gpu else "vit_tiny_patch16_224"
    vit_kwargs = {} if gpu else {"patch_size": 8, "depth": 4}
    text = {} if gpu else {"embed_dim": 64, "text_width": 64, "text_depth": 2, "text_heads": 4}
    optim = OptimConfig(name="adamw", lr=1e-4, warmup_epochs=0)
    return {
        f"classification[{vit}]": (lambda: ClassificationModule(vit, num_classes=10, image_size=size,
                                                                backbone_kwargs=vit_kwargs, optim=optim), "backbone",
                                    {"attribute": "backbone"}, False),
        f"mae[{vit}, 75% masked]": (lambda: MAEModule(vit, num_classes=10, image_size=size, backbone_kwargs=vit_kwargs,
                                                      log_images_every_n_steps=10**9, optim=optim), "backbone",
                                   {"attribute": "backbone", "blocks": True}, False),
        f"clip[{vit}]": (lambda: CLIPModule(vit, num_classes=10, image_size=size, backbone_kwargs=vit_kwargs,
                                            text_max_length=context_length, optim=optim, **text), "model",
                         {"attribute": "model.image_encoder", "blocks": True}, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "visionlab-bench-data")
    parser.add_argument("--switches", nargs="*", default=list(SWITCHES), choices=list(SWITCHES),
                        help="speed switches measured on the synthetic feed (default: all)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    size = 224 if gpu else 64
    batch = (128 if not args.quick else 64) if gpu else 16
    steps, warmup = (30, 10) if args.quick else (100, 20)
    if not gpu:
        steps, warmup = (6, 2) if args.quick else (12, 3)
    workers = args.workers or (8 if gpu else 2)
    context_length = 32
    count = int(batch * (steps + warmup + 2) / 0.85)  # 10% goes to the (unused) val split
    tree = write_jpeg_tree(args.workdir, count, 256 if gpu else 80)
    data_args = dict(source=str(tree), image_size=size, batch_size=batch, num_workers=workers, val_fraction=0.1)

    rows = []
    for name, (build, network, compiled, captions) in modules(gpu, size, context_length).items():
        # an untimed first fit per module: its first steps pay one-time costs (kernel selection, allocator) beyond
        # the warm-up steps, which would bias the first timed row
        runs = [("synthetic", "warm-up"), ("synthetic", "eager"), ("ffcv", "eager"), *(("synthetic", s) for s in args.switches)]
        for feed, switch in runs:
            if feed == "ffcv":
                loader = FFCVLoader(cache_dir=str(args.workdir / "beton"), write_mode="jpg", max_resolution=256 if gpu else 80)
            else:
                loader = SyntheticLoader(count)
            prompts = ClassPrompts(context_length=context_length) if captions else None
            data = ImageDataModule(loader=loader, batches=prompts, **data_args)
            timer = Timer(warmup)
            switches = SWITCHES[switch](network, compiled) if switch in SWITCHES else []
            trainer = pl.Trainer(accelerator="auto", devices=1, precision="bf16-mixed" if gpu else "32-true",
                                 max_epochs=1, limit_train_batches=steps + warmup,
                                 limit_val_batches=0, logger=False, enable_checkpointing=False,
                                 enable_model_summary=False, enable_progress_bar=False,
                                 callbacks=[*switches, timer])
            torch.manual_seed(0)
            torch.compiler.reset()  # each compiled run pays (and is timed after) its own compilation
            trainer.fit(build(), data)
            if switch == "warm-up":
                continue
            timed = trainer.global_step - warmup
            rows.append((name, feed, switch, timed * batch / timer.seconds, timer.seconds / timed * 1000))
            print(f"  {name} {feed} {switch}: {rows[-1][3]:.1f} images/s", flush=True)

    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ngpu_throughput on {device}: {size}px, batch {batch}, {'bf16-mixed' if gpu else 'fp32'}, "
          f"{workers} loader workers, {steps} timed steps after {warmup} warm-up steps")
    print(f"{'module':<40} {'feed':<10} {'switches':<22} {'images/s':>10} {'ms/step':>9}")
    for name, feed, switch, rate, ms in rows:
        print(f"{name:<40} {feed:<10} {switch:<22} {rate:>10.1f} {ms:>9.1f}")
    for name in dict.fromkeys(r[0] for r in rows):
        by = {(r[1], r[2]): r[3] for r in rows if r[0] == name}
        eager = by[("synthetic", "eager")]
        print_ratio(f"{name} ffcv_vs_synthetic", by[("ffcv", "eager")] / eager)
        print_ratios({f"{name} {switch}_vs_eager": by[("synthetic", switch)] / eager for switch in args.switches})


if __name__ == "__main__":
    main()
