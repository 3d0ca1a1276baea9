"""The torchvision loader back-end: the FFCV back-end's crops and batches through ``torch.utils.data`` (baseline, fallback)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datamodules.base import LoaderBackend


class CenterCropRatio(torch.nn.Module):
    """Centre square of ``ratio`` x the short side, resized to ``size`` (FFCV's CenterCropRGBImageDecoder)."""

    def __init__(self, size: int, ratio: float):
        super().__init__()
        self.size, self.ratio = size, ratio

    def forward(self, image):
        height, width = TF.get_size(image)
        side = max(1, int(round(min(height, width) * self.ratio)))
        return TF.resize(TF.center_crop(image, [side, side]), [self.size, self.size], antialias=True)


class _SourceDataset(Dataset):
    """``(image, label)`` items of an image source through ``transform``; ``(image, label, index)`` with ``with_index``
    (the item's position in the source, which the caption and replay lookups key on)."""

    def __init__(self, source, transform, with_index: bool = False):
        self.source, self.transform, self.with_index = source, transform, with_index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        if hasattr(self.source, "load_pil"):  # files: decode on access, like any ImageFolder loader
            image, label = self.source.load_pil(index), int(self.source.labels[index])
        else:
            array, label = self.source[index]
            image = Image.fromarray(np.asarray(array))
        return (self.transform(image), label, index) if self.with_index else (self.transform(image), label)


class TorchvisionLoader(LoaderBackend):
    """The same sources, crops and batches as ``FFCVLoader`` through ``torch.utils.data`` worker processes: no
    files written, every image decoded (files) or converted (arrays) on each access. The reference that the FFCV
    back-end is tested against, and the fallback where FFCV is not installed."""

    def transform(self, train: bool) -> v2.Compose:
        dm = self.datamodule
        hp, size = dm.hparams, dm.image_size
        if train:
            ops = [v2.RandomResizedCrop(size, scale=tuple(hp.rrc_scale), ratio=tuple(hp.rrc_ratio), antialias=True)]
            if hp.hflip:
                ops.append(v2.RandomHorizontalFlip())
        else:
            ops = [CenterCropRatio(size, hp.val_crop_ratio)]
        return v2.Compose([*ops, v2.PILToTensor()])  # uint8 (3, H, W); normalised on the device

    def setup(self, stage: str) -> None:
        for split in ("train", *self.datamodule.eval_sets()):
            self.datamodule.get_source(split)

    def dataset(self, split: str, train: bool) -> Dataset:
        """``split`` as ``(uint8 (3, S, S) image, label[, index])`` items with train or eval transforms; with
        ``full_train_images`` the ``train`` split is whole images (centre squares resized to the transform's
        ``decode_size`` when it has one) with their index."""
        dm = self.datamodule
        if split == "train" and dm.full_train_images:
            decode_size = dm.batches.decode_size
            ops = [] if decode_size is None else [CenterCropRatio(decode_size, 1.0)]
            return _SourceDataset(dm.get_source(split), v2.Compose([*ops, v2.PILToTensor()]), with_index=True)
        return _SourceDataset(dm.get_source(split), self.transform(train), dm.yields_index)

    def decoded_pixels(self, decode_size: int | None) -> str:
        return "source" if decode_size is None else f"torchvision centre{decode_size}"

    def split_loader(self, split: str, train: bool, indices=None) -> DataLoader:
        dm = self.datamodule
        dataset = self.dataset(split, train)
        if indices is not None:
            dataset = Subset(dataset, [int(i) for i in indices])
        return DataLoader(
            dataset,
            batch_size=dm.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=dm.num_workers,
            persistent_workers=dm.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(dm.seed) if train else None,
        )
