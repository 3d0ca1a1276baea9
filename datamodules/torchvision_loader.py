"""The torchvision loader back-end: the FFCV back-end's crops and batches through ``torch.utils.data`` (baseline, fallback)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datamodules.augment import step_seed
from datamodules.backend import EpochStart
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
    (the item's position in the source, which the caption and replay lookups key on).

    A key ``(index, seed)`` (what ``EpochOrder`` yields) draws the transform's random crop and flip from a generator
    seeded with ``seed`` instead of the process's global stream."""

    def __init__(self, source, transform, with_index: bool = False):
        self.source, self.transform, self.with_index = source, transform, with_index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if hasattr(self.source, "load_pil"):  # files: decode on access, like any ImageFolder loader
            image, label = self.source.load_pil(index), int(self.source.labels[index])
        else:
            array, label = self.source[index]
            image = Image.fromarray(np.asarray(array))
        if seed is None:
            image = self.transform(image)
        else:  # torchvision's random transforms draw from the global generator: seeded here, restored after
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                image = self.transform(image)
        return (image, label, index) if self.with_index else (image, label)


def epoch_order(indices: np.ndarray, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's training order of ``indices`` for ``epoch``: FFCV's random order (``ffcv.traversal_order.Random``),
    so both back-ends visit the same samples in the same order: one process permutes with NumPy seeded by
    ``seed + epoch``; ranks take their share of ``DistributedSampler``'s (seed, epoch) shuffle, padded as it pads."""
    indices = np.asarray(indices)
    if world_size == 1:
        return np.random.default_rng(seed + epoch).permutation(indices)
    sampler = DistributedSampler(indices, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return indices[np.array(list(sampler), dtype=np.int64)]


class EpochOrder(Sampler):
    """The training keys of one rank: ``(source index, draw seed)`` in ``epoch_order`` for ``epoch``, without its
    first ``skip`` samples; each sample's crop and flip seed is ``step_seed(augment_seed, rank, epoch, position)``
    with its position in the whole epoch's order. ``epoch`` and ``skip`` are set by ``ResumableDataLoader``."""

    def __init__(self, indices: np.ndarray, seed: int, augment_seed: int, rank: int, world_size: int):
        self.indices, self.seed, self.augment_seed = np.asarray(indices), seed, augment_seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.world_size)  # DistributedSampler's padded share

    def __iter__(self):
        order = epoch_order(self.indices, self.seed, self.epoch, self.rank, self.world_size)
        for position in range(self.skip, len(order)):
            yield int(order[position]), step_seed(self.augment_seed, self.rank, self.epoch, position)


class ResumableDataLoader:
    """A training ``DataLoader`` over an ``EpochOrder`` whose epochs start at their first batch, where the DataModule
    says which epoch it is and how many batches a resumed run already trained on (``LoaderBackend``'s contract).
    It shards by itself, so Lightning (which sees no ``DataLoader``) adds no sampler of its own."""

    def __init__(self, loader: DataLoader, order: EpochOrder, datamodule):
        self.loader, self.order, self.datamodule = loader, order, datamodule
        self.started = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return EpochStart(self._start_epoch)

    def _start_epoch(self):
        self.order.epoch, skip = self.datamodule.train_epoch_start(self.started)
        self.order.skip = skip * self.loader.batch_size
        self.started += 1
        return iter(self.loader)


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

    def split_loader(self, split: str, train: bool, indices=None) -> DataLoader | ResumableDataLoader:
        dm = self.datamodule
        dataset = self.dataset(split, train)
        settings = dict(batch_size=dm.batch_size, num_workers=dm.num_workers, persistent_workers=dm.num_workers > 0,
                        pin_memory=torch.cuda.is_available())
        if not train:
            if indices is not None:
                dataset = Subset(dataset, [int(i) for i in indices])
            return DataLoader(dataset, shuffle=False, drop_last=False, **settings)
        trainer = dm.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        order = EpochOrder(np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64),
                           dm.seed, dm.augment.seed, rank, world)
        # the generator seeds the workers without a draw from the global stream (which the model's own draws use)
        loader = DataLoader(dataset, sampler=order, drop_last=True, generator=torch.Generator().manual_seed(dm.seed),
                            **settings)
        return ResumableDataLoader(loader, order, dm)
