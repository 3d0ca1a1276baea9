"""Image sources: the embedded Fashion-MNIST (Debian IDX files) and ImageFolder trees.

A source is an indexable sequence of ``(uint8 HWC RGB numpy image, int label)`` with ``classes``.
Splits are deterministic: Fashion-MNIST uses its own train/test files; an ImageFolder uses
``train/`` and ``val/`` subfolders when present, else a seeded per-class split.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from modules.components.errors import ConfigError, DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file into a numpy array (uint8 data only, as in (Fashion-)MNIST)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file: reinstall dataset-fashion-mnist (apt-get install --reinstall)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise DataError(f"{path} is truncated ({len(data) - offset} of {count} bytes): reinstall the dataset package")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


class ArraySource:
    """In-memory images (N, H, W) or (N, H, W, 3) uint8 with labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], fingerprint: str):
        self.images, self.labels, self.classes, self.fingerprint = images, labels.astype(np.int64), list(classes), fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image = self.images[index]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)  # grey -> RGB, same pixels in every channel
        return np.ascontiguousarray(image), int(self.labels[index])


class FileSource:
    """Image files on disk with labels, decoded to RGB with PIL on access."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], classes: Sequence[str], fingerprint: str):
        self.files, self.labels, self.classes, self.fingerprint = list(files), np.asarray(labels, np.int64), list(classes), fingerprint

    def __len__(self) -> int:
        return len(self.files)

    def load_pil(self, index: int) -> Image.Image:
        try:
            with Image.open(self.files[index]) as img:
                return img.convert("RGB")
        except Exception as err:
            raise DataError(f"cannot decode image {self.files[index]} ({err}): remove or replace the file") from err

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.asarray(self.load_pil(index)), int(self.labels[index])


def _subset(source, indices: np.ndarray):
    if isinstance(source, ArraySource):
        return ArraySource(source.images[indices], source.labels[indices], source.classes, source.fingerprint)
    return FileSource([source.files[i] for i in indices], source.labels[indices], source.classes, source.fingerprint)


def restrict(source, classes: Sequence[int] | None, limit: int | None, seed: int, tag: str):
    """Keep only ``classes`` (relabelled 0..k-1 in the given order) and at most ``limit`` samples (seeded)."""
    fingerprint = source.fingerprint
    if classes:
        classes = list(classes)
        bad = [c for c in classes if not 0 <= c < len(source.classes)]
        if bad:
            raise ConfigError(f"class indices {bad} out of range: the source has {len(source.classes)} classes")
        keep = np.flatnonzero(np.isin(source.labels, classes))
        remap = {c: i for i, c in enumerate(classes)}
        picked = _subset(source, keep)
        picked.labels = np.array([remap[int(c)] for c in picked.labels], np.int64)
        picked.classes = [source.classes[c] for c in classes]
        source, fingerprint = picked, f"{fingerprint}-c{'_'.join(map(str, classes))}"
    if limit is not None and limit < len(source):
        order = np.sort(np.random.default_rng(seed).permutation(len(source))[:limit])
        source, fingerprint = _subset(source, order), f"{fingerprint}-n{limit}s{seed}"
    source.fingerprint = f"{fingerprint}-{tag}"
    return source


def fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> ArraySource:
    """The embedded default dataset: 60k train / 10k test 28x28 grey product photos, 10 classes."""
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    image_file, label_file = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for f in (image_file, label_file):
        if not f.is_file():
            raise ConfigError(f"Fashion-MNIST file {f} not found: run `apt-get install dataset-fashion-mnist` (scripts/setup.sh does)")
    images, labels = read_idx(image_file), read_idx(label_file)
    if len(images) != len(labels):
        raise DataError(f"{image_file} and {label_file} disagree on the sample count: reinstall the dataset")
    return ArraySource(images, labels, FASHION_MNIST_CLASSES, f"fmnist-{prefix}")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    return files, labels


def image_folder(root: str | Path, split: str, val_fraction: float = 0.1, seed: int = 0) -> FileSource:
    """An ImageFolder tree (one folder per class), with ``train/``+``val/`` subfolders or a seeded split."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data path {root} does not exist or is not a folder: set data.source to an ImageFolder tree")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = [d.name for d in _class_dirs(root / "train")]
        files, labels = _scan(root / split, classes)
    else:
        classes = [d.name for d in _class_dirs(root)]
        files, labels = _scan(root, classes)
        if files:
            rng = np.random.default_rng(seed)
            labels_arr = np.asarray(labels)
            keep = []
            for c in range(len(classes)):
                members = np.flatnonzero(labels_arr == c)
                members = members[rng.permutation(len(members))]
                n_val = int(round(len(members) * val_fraction))
                keep.append(members[:n_val] if split == "val" else members[n_val:])
            idx = np.sort(np.concatenate(keep))
            files, labels = [files[i] for i in idx], [labels[i] for i in idx]
    if not classes or not files:
        raise DataError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}"
            f"{'/' + split if (root / split).is_dir() else ''}: expected one sub-folder of images per class"
        )
    digest = hashlib.sha1(
        "\n".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode()
    ).hexdigest()[:12]
    return FileSource(files, labels, classes, f"folder-{digest}")
