"""ImageNet-scale data path: write rate, bytes/image and loader images/s of each FFCV write mode at 224 px.

Extends ``benchmarks/dataloading.py`` (its timing helpers) to ImageNet-like files: a JPEG tree cut from the
scikit-image photographs (random crops rescaled to 300-500 px on the long side, JPEG quality 90, 100 classes; 10 with --quick),
written by ``visionlab prepare-data``'s code path (``FFCVLoader.write_prepared``) in ``raw``, ``jpg`` and
``proportion`` (ffcv-imagenet's recipe: at most 500 px, half JPEG at quality 90). Each is then read at 224 px
with random-resized-crop + flip against the torchvision ImageFolder loader on the same files, with the same
worker count, and again with ``datamodules.augment.RandAugment`` run on each uint8 batch as the DataModule
does after transfer (here on this CPU's main thread; on a GPU it runs on the device). The write rate is
extrapolated to ImageNet-1k (1,281,167 train + 50,000 val images) on this machine's cores.

The streaming back-end (``datamodules.streaming_loader.StreamingLoader``) gets two rows: its WebDataset shards
written from the same tree (the source JPEG bytes, ~64 MB shards) and read in place, and the same shards read as a
remote store (a folder standing in for one) through a cache limited to half their size, from an empty cache, so
every shard is copied, checked (SHA-256) and evicted again as the epochs sweep over it.

    python benchmarks/imagenet_data.py --quick   # 1,000 files, 1 timed epoch (a few minutes on 2 shared cores)
    python benchmarks/imagenet_data.py           # 20,000 files, 2 timed epochs
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dataloading import images_per_second, warm_up  # benchmarks/dataloading.py
from datamodules.augment import RandAugment
from datamodules.base import loader_batch
from datamodules.beton import default_writers
from datamodules.base import ImageDataModule
from datamodules.ffcv_loader import FFCVLoader
from datamodules.streaming_loader import StreamingLoader
from datamodules.torchvision_loader import TorchvisionLoader

IMAGENET_IMAGES = 1_281_167 + 50_000
MODES = {
    "raw": dict(write_mode="raw", max_resolution=500),
    "jpg": dict(write_mode="jpg", max_resolution=500, jpeg_quality=90),
    "proportion": dict(write_mode="proportion", max_resolution=500, jpeg_quality=90, compress_probability=0.5),
}


def photos() -> list[np.ndarray]:
    """The colour photographs that ship with scikit-image (``pip install scikit-image``)."""
    try:
        from skimage import data
    except ImportError as err:
        raise SystemExit("benchmarks/imagenet_data.py needs scikit-image: pip install scikit-image") from err
    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle_left",
             "retina", "colorwheel", "cat", "logo"]
    images = []
    for name in names:
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - some need optional downloads; skip them
            continue
        if image.ndim == 3 and image.shape[2] >= 3 and min(image.shape[:2]) >= 128:
            images.append(np.ascontiguousarray(image[..., :3]))
    return images


def write_photo_tree(root: Path, count: int, classes: int, seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) in ``classes`` folders: random crops of the photos, long side 300-500 px."""
    tree = root / f"photos-{count}-{classes}"
    if (tree / ".complete").exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    rng, sources = np.random.default_rng(seed), photos()
    for index in range(count):
        photo = sources[rng.integers(len(sources))]
        height, width = photo.shape[:2]
        ch, cw = int(height * rng.uniform(0.5, 1.0)), int(width * rng.uniform(0.5, 1.0))
        top, left = rng.integers(height - ch + 1), rng.integers(width - cw + 1)
        crop = Image.fromarray(photo[top:top + ch, left:left + cw])
        side = int(rng.integers(300, 501))
        scale = side / max(ch, cw)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        folder = tree / f"n{index % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{index:07d}.JPEG", quality=90)
    (tree / ".complete").touch()
    return tree


def loader_rates(dm, epochs: int) -> tuple[float, float, float]:
    """(warm-up s, loader img/s, loader + RandAugment img/s) over ``epochs`` timed epochs."""
    loader = dm.train_dataloader()
    warmup = warm_up(loader)
    rate = images_per_second(dm, loader, epochs, normalize=False)
    augment = RandAugment()  # N=2, M=9 of 10
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images in (loader_batch(batch)["image"] for batch in loader):
            augment(images.float() / 255)
            seen += images.shape[0]
    return warmup, rate, seen / (time.perf_counter() - start)


def cold_rates(dm, epochs: int) -> tuple[float, float, float]:
    """``loader_rates`` from an empty remote-shard cache each time (no warm-up: its copying is what is timed)."""
    rates = []
    for augment in (None, RandAugment()):
        shutil.rmtree(dm.loader.folder(), ignore_errors=True)
        loader, seen, start = dm.train_dataloader(), 0, time.perf_counter()
        for _ in range(epochs):
            for images in (loader_batch(batch)["image"] for batch in loader):
                if augment is not None:
                    augment(images.float() / 255)
                seen += images.shape[0]
        rates.append(seen / (time.perf_counter() - start))
    return 0.0, *rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 files, 1 timed epoch")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "visionlab-bench-imagenet")
    args = parser.parse_args()
    count = args.images or (1000 if args.quick else 20000)
    epochs = args.epochs or (1 if args.quick else 2)

    start = time.perf_counter()
    tree = write_photo_tree(args.workdir, count, classes=max(1, min(100, count // 100)))
    files = sorted(tree.rglob("*.JPEG"))
    source_bytes = sum(f.stat().st_size for f in files) / len(files)
    print(f"tree: {len(files)} JPEGs, {source_bytes / 1024:.0f} KiB/image ({time.perf_counter() - start:.0f} s)")
    common = dict(source=str(tree), image_size=args.crop, batch_size=args.batch_size, num_workers=args.workers,
                  val_fraction=0.02, rrc_scale=(0.08, 1.0))
    # One small untimed write first: the writer's numba compilation is paid once per process, not per mode.
    warm = ImageDataModule(loader=FFCVLoader(str(args.workdir / "beton-warm-up"), write_mode="proportion"), train_limit=32,
                           val_limit=4, **common).loader
    shutil.rmtree(warm.folder(), ignore_errors=True)
    warm.write_prepared()
    rows = []
    tv = ImageDataModule(loader=TorchvisionLoader(), **common)
    tv.setup("fit")
    rows.append(("torchvision", None, source_bytes, *loader_rates(tv, epochs)))
    for name, settings in MODES.items():
        dm = ImageDataModule(loader=FFCVLoader(str(args.workdir / "beton"), write_workers=default_writers(), **settings),
                             **common)
        shutil.rmtree(dm.loader.folder(), ignore_errors=True)
        start = time.perf_counter()
        manifest = dm.loader.write_prepared()
        write_rate = sum(s["samples"] for s in manifest["splits"].values()) / (time.perf_counter() - start)
        dm.setup("fit")
        per_image = sum(s["bytes"] for s in manifest["splits"].values()) / sum(s["samples"] for s in manifest["splits"].values())
        rows.append((f"ffcv {name}", write_rate, per_image, *loader_rates(dm, epochs)))
    dm = ImageDataModule(loader=StreamingLoader(str(args.workdir / "shards"), write_workers=default_writers()), **common)
    shutil.rmtree(dm.loader.folder(), ignore_errors=True)
    start = time.perf_counter()
    manifest = dm.loader.write_shards()
    written = sum(s["samples"] for s in manifest["splits"].values())
    write_rate = written / (time.perf_counter() - start)
    per_image = sum(s["bytes"] for s in manifest["splits"].values()) / written
    dm.setup("fit")
    rows.append(("streaming", write_rate, per_image, *loader_rates(dm, epochs)))
    train_bytes = manifest["splits"]["train"]["bytes"]
    remote = ImageDataModule(loader=StreamingLoader(str(args.workdir / "shards-cache"), remote=str(dm.loader.folder()),
                                                    cache_limit=max(train_bytes // 2, max(
                                                        s["bytes"] for s in manifest["splits"]["train"]["shards"]) * 2)),
                             **common)
    remote.setup("fit")
    rows.append(("stream cold 50%", None, per_image, *cold_rates(remote, epochs)))

    print(f"\nimagenet_data: {len(files)} photo JPEGs (300-500 px) -> RRC {args.crop} px + flip, batch {args.batch_size}, "
          f"{args.workers} loader workers, {default_writers()} writer processes, mean of {epochs} epoch(s) after 1 warm-up")
    print(f"{'variant':<16} {'write img/s':>11} {'KiB/image':>10} {'warm-up s':>9} {'loader img/s':>12} "
          f"{'+RandAug img/s':>14} {'vs tv':>6} {'IN-1k prepare h':>15} {'IN-1k GiB':>9}")
    base = rows[0][4]
    for name, write_rate, per_image, warmup, rate, rate_aug in rows:
        hours = f"{IMAGENET_IMAGES / write_rate / 3600:.1f}" if write_rate else "-"
        print(f"{name:<16} {write_rate or 0:>11.0f} {per_image / 1024:>10.0f} {warmup:>9.1f} {rate:>12.0f} "
              f"{rate_aug:>14.0f} {rate / base:>5.2f}x {hours:>15} {per_image * IMAGENET_IMAGES / 2**30:>9.0f}")
    print("(KiB/image of the beton files include FFCV's 8 MiB page padding per file; torchvision's is the source "
          "JPEGs'; the shards' are the source JPEGs plus 1.5 KiB of tar headers; 'stream cold 50%' reads the shards as a "
          "remote store from an empty cache limited to half the training shards (no warm-up); +RandAug runs kornia on "
          "this CPU's main thread, where a GPU run would do it on the device)")


if __name__ == "__main__":
    main()
