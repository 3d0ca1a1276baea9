"""Image sources: the embedded Fashion-MNIST (Debian IDX files) and ImageFolder trees.

A source is an indexable sequence of ``(uint8 HWC RGB numpy image, int label)`` with ``classes``.
Splits are deterministic: Fashion-MNIST uses its own train/test files; an ImageFolder uses
``train/`` and ``val/`` subfolders when present, else a seeded per-class split. ImageNet's layouts
(a flat ``val/`` folder plus a labels file, a synset -> index map) are read by ``datamodules.imagenet``.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from datamodules.imagenet import read_class_index, read_val_labels
from modules.components.errors import ConfigError, DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# per-channel pixel mean / std of the Fashion-MNIST training images (grey, repeated over RGB); configs/data/
# fashion_mnist*.yaml hold the same numbers
FASHION_MNIST_MEAN = (0.286, 0.286, 0.286)
FASHION_MNIST_STD = (0.353, 0.353, 0.353)
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


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16/32-bit grey scaled (not clipped), alpha composited on ``background``.

    PIL's own ``convert("RGB")`` clips 16-bit grey (``I;16``/``I``) at 255, which turns most of such a PNG
    white, and drops alpha, which shows whatever colour transparent pixels happen to hold (often black).
    CMYK (including Adobe's inverted JPEGs, which PIL's decoder un-inverts), palette, bilevel and YCbCr
    images go through ``convert``.
    """
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        pixels = np.asarray(image, dtype=np.int64)
        peak = 65535 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255
        grey = np.clip(np.round(pixels * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in {"RGBA", "LA", "PA", "La", "RGBa"}:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class FileSource:
    """Image files on disk with labels, decoded to RGB with PIL on access."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], classes: Sequence[str], fingerprint: str):
        self.files, self.labels, self.classes, self.fingerprint = list(files), np.asarray(labels, np.int64), list(classes), fingerprint

    def __len__(self) -> int:
        return len(self.files)

    def load_pil(self, index: int) -> Image.Image:
        try:
            with Image.open(self.files[index]) as img:
                return to_rgb(img)
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


def has_split_layout(root: Path) -> bool:
    """``root/train`` + ``root/val`` (val as class folders, or flat with a labels file)."""
    return (root / "train").is_dir() and (root / "val").is_dir()


def folder_classes(root: str | Path, class_index: str | None = None) -> list[str]:
    """Class folder names in label order: the class-index map's order if given, else sorted folder names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data path {root} does not exist or is not a folder: set data.source to an ImageFolder tree")
    base = root / "train" if has_split_layout(root) else root
    folders = [d.name for d in _class_dirs(base)]
    if class_index is None:
        if not folders:
            raise ConfigError(f"no class sub-folders in {base}: an ImageFolder tree needs one folder of images per class")
        return folders
    classes = read_class_index(class_index)
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ConfigError(f"class folders {unknown[:5]} of {base} are not in the class-index map {class_index}")
    return classes


def _scan(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    return files, labels


def _seeded_split(files, labels, num_classes: int, split: str, val_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(labels_arr == c)
        members = members[rng.permutation(len(members))]
        n_val = int(round(len(members) * val_fraction))
        keep.append(members[:n_val] if split == "val" else members[n_val:])
    idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    return [files[i] for i in idx], [labels[i] for i in idx]


def image_folder(root: str | Path, split: str, val_fraction: float = 0.1, seed: int = 0,
                 class_index: str | None = None, val_labels: str | None = None) -> FileSource:
    """An ImageFolder tree (one folder per class), with ``train/``+``val/`` subfolders or a seeded split.

    ``val/`` may also be ImageNet's flat folder of images with ``val_labels`` (see
    ``datamodules.imagenet.read_val_labels``); ``class_index`` fixes the label of every class folder.
    """
    root = Path(root).expanduser()
    classes = folder_classes(root, class_index)
    if has_split_layout(root):
        val_dir = root / "val"
        if split == "val" and (val_labels is not None or not _class_dirs(val_dir)):
            if val_labels is None:
                raise ConfigError(
                    f"{val_dir} holds images but no class folders: set data.val_labels to its labels file "
                    "(ILSVRC ground-truth text, or a CSV of file,label)"
                )
            files, labels = read_val_labels(val_labels, val_dir, classes, class_index, IMAGE_SUFFIXES)
        else:
            files, labels = _scan(root / split, classes)
    else:
        files, labels = _scan(root, classes)
        if files:
            files, labels = _seeded_split(files, labels, len(classes), split, val_fraction, seed)
    if not classes or not files:
        raise DataError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}"
            f"{'/' + split if (root / split).is_dir() else ''}: expected one sub-folder of images per class"
        )
    return FileSource(files, labels, classes, _fingerprint(files, labels))


def _fingerprint(files: Sequence[Path], labels: Sequence[int]) -> str:
    stats = ((f, f.stat(), y) for f, y in zip(files, labels))
    digest = hashlib.sha1("\n".join(f"{f}:{st.st_size}:{st.st_mtime_ns}:{y}" for f, st, y in stats).encode()).hexdigest()[:12]
    return f"folder-{digest}"


def labelled_folder(root: str | Path, classes: Sequence[str]) -> FileSource:
    """An extra evaluation set in ImageFolder layout, labelled with the training classes' indices.

    Each class folder is named as a training class (``classes``, the folder names or class-index map of the
    training data) or by its 0-based index, as ImageNet-V2's ``0`` .. ``999``; another name is an error,
    since guessing would mislabel silently.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"evaluation folder {root} does not exist: set data.extra_eval to ImageFolder trees")
    position = {name: index for index, name in enumerate(classes)}
    files, labels = [], []
    for folder in _class_dirs(root):
        label = position.get(folder.name)
        if label is None and folder.name.isdigit() and int(folder.name) < len(classes):
            label = int(folder.name)
        if label is None:
            raise ConfigError(f"class folder {folder.name!r} of {root} is neither a training class nor a class index "
                              f"below {len(classes)}: name the folders as the training classes")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"no images found under {root}: expected one sub-folder of images per class")
    return FileSource(files, labels, classes, _fingerprint(files, labels))
