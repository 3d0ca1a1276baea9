"""Images/s of the FFCV loader back-end vs the torchvision one on the same JPEG files.

Fashion-MNIST images are written once as an ImageFolder of RGB JPEGs upscaled to 160 px (ImageNet-like
decode + crop work); both DataModules then run random-resized-crop + flip to the same crop size with the
same worker count (the FFCV variants with visionlab's seeded crops, and with FFCV's own unseeded ones). The
first epoch is a warm-up (FFCV compiles its pipeline with numba); the mean of the following epochs is reported.

Two rates per variant: ``loader`` counts the uint8 batches as the loader hands them over (the target: in
training the uint8 -> float normalisation runs on the accelerator in ``on_after_batch_transfer``), and
``+norm`` also runs that normalisation on this CPU's main thread, which on a 2-core machine competes with
the loader for the same cores.

    python benchmarks/dataloading.py           # 6,000 images, 3 timed epochs
    python benchmarks/dataloading.py --quick   # 2,000 images, 2 timed epochs (~1 min)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image

from datamodules import sources
from datamodules.base import ImageDataModule, loader_batch
from datamodules.ffcv_loader import FFCVLoader
from datamodules.torchvision_loader import TorchvisionLoader

from harness import print_ratios


def write_jpeg_tree(root: Path, count: int, size: int) -> Path:
    """First ``count`` Fashion-MNIST training images as ``root/<class>/<i>.jpg`` at ``size`` px (cached)."""
    tree = root / f"fmnist-{count}-{size}px"
    marker = tree / ".complete"
    if marker.exists():
        return tree
    data = sources.fashion_mnist("train")
    for index in range(count):
        label = int(data.labels[index])
        folder = tree / f"{label}-{data.classes[label].replace('/', '-')}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(data.images[index]).convert("RGB").resize((size, size), Image.BICUBIC)
        image.save(folder / f"{index:06d}.jpg", quality=90)
    marker.touch()
    return tree


def images_per_second(dm, loader, epochs: int, normalize: bool) -> float:
    """Mean images/s over ``epochs`` epochs of ``loader`` (optionally normalising each batch with ``dm``)."""
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images = dm.on_after_batch_transfer(batch, 0)["image"] if normalize else loader_batch(batch)["image"]
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def warm_up(loader) -> float:
    """One untimed epoch (worker start-up, numba compilation, OS cache); returns its seconds."""
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 images, 2 timed epochs")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--size", type=int, default=160, help="stored JPEG side")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "visionlab-bench-data")
    args = parser.parse_args()
    count = args.images or (2000 if args.quick else 6000)
    epochs = args.epochs or (2 if args.quick else 3)

    tree = write_jpeg_tree(args.workdir, count, args.size)
    common = dict(source=str(tree), image_size=args.crop, batch_size=args.batch_size, num_workers=args.workers,
                  val_fraction=0.05, rrc_scale=(0.08, 1.0))
    variants = {
        "torchvision": ImageDataModule(loader=TorchvisionLoader(), **common),
        "ffcv_jpg": ImageDataModule(loader=FFCVLoader(str(args.workdir / "beton"), write_mode="jpg", jpeg_quality=90), **common),
        "ffcv_raw": ImageDataModule(loader=FFCVLoader(str(args.workdir / "beton"), write_mode="raw"), **common),
        # FFCV's own unseeded crop decoder and flip (seeded_augmentation false): the price of seeded crops
        "ffcv_jpg_unseeded": ImageDataModule(loader=FFCVLoader(str(args.workdir / "beton"), write_mode="jpg", jpeg_quality=90,
                                                               seeded_augmentation=False), **common),
        "ffcv_raw_unseeded": ImageDataModule(loader=FFCVLoader(str(args.workdir / "beton"), write_mode="raw",
                                                               seeded_augmentation=False), **common),
    }
    rows = []
    for name, dm in variants.items():
        start = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        prep = time.perf_counter() - start
        loader = dm.train_dataloader()
        warmup = warm_up(loader)
        rate = images_per_second(dm, loader, epochs, normalize=False)
        rate_norm = images_per_second(dm, loader, epochs, normalize=True)
        del loader
        beton = getattr(dm.loader, "beton_path", None)
        size = sum(p.stat().st_size for p in Path(beton("train")).parent.glob("*.beton")) if beton else 0
        rows.append((name, rate, rate_norm, warmup, prep, size))

    print(f"\ndataloading: {count} JPEGs at {args.size}px -> RRC {args.crop}px + flip + normalise, "
          f"batch {args.batch_size}, {args.workers} workers, mean of {epochs} epochs after 1 warm-up epoch")
    print(f"{'variant':<18} {'loader img/s':>12} {'+norm img/s':>12} {'warm-up s':>10} {'prepare s':>10} {'beton MB':>9}")
    for name, rate, rate_norm, warmup, prep, size in rows:
        print(f"{name:<18} {rate:>12.0f} {rate_norm:>12.0f} {warmup:>10.1f} {prep:>10.1f} {size / 2**20:>9.1f}")
    base, base_norm = rows[0][1], rows[0][2]
    print_ratios({name: rate / base for name, rate, *_ in rows[1:]})
    print_ratios({f"{name}+norm": rate_norm / base_norm for name, _, rate_norm, *_ in rows[1:]})
    rates = {name: rate for name, rate, *_ in rows}
    print_ratios({f"{mode}_seeded_vs_unseeded": rates[mode] / rates[f"{mode}_unseeded"] for mode in ("ffcv_jpg", "ffcv_raw")})


if __name__ == "__main__":
    main()
