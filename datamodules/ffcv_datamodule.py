"""FFCV DataModule: writes ``.beton`` files once into a cache, then loads them with ``ffcv.loader.Loader``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from datamodules.base import ImageDataModule
from datamodules.beton import check_beton, write_beton
from modules.components.errors import ConfigError


class _Loader:
    """An ``ffcv.loader.Loader`` whose epoch buffers are allocated outside ``torch.inference_mode``.

    ``Trainer.validate/test/predict`` iterate loaders under inference mode; FFCV allocates its batch buffers
    when an epoch starts and fills them in place from its own thread, which torch forbids for inference
    tensors (the loader thread dies and the main thread waits forever).
    """

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        with torch.inference_mode(False):
            return iter(self.loader)


def _require_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "ffcv is not installed: run scripts/setup.sh, or use datamodules.torchvision_datamodule.TorchvisionDataModule"
        ) from err


def index_decoder():
    """An FFCV decoder for any scalar field that outputs the sample's index in the ``.beton`` instead of its value.

    Use it in an extra pipeline, e.g. ``PipelineSpec("label", decoder=index_decoder(), transforms=[ToTensor(),
    Squeeze()])``; the indices are global ``.beton`` indices, also under ``distributed=True`` sharding.
    """
    from ffcv.fields.basics import IntDecoder

    class IndexDecoder(IntDecoder):
        def generate_code(self):
            def decode(indices, destination, metadata, storage_state):
                for position, sample_id in enumerate(indices):
                    destination[position] = sample_id
                return destination[:len(indices)]

            return decode

    return IndexDecoder()


class FFCVDataModule(ImageDataModule):
    """Labelled images through FFCV: random-resized-crop + flip for train, centre crop for val.

    The ``.beton`` files live in ``cache_dir/<fingerprint>/{train,val}.beton`` where the fingerprint
    covers the source files, split, subsets and write settings, so changing any of them writes new files
    and a finished file is never rewritten. Under DDP the loader shards with ``distributed=True``.

    Args:
        cache_dir: folder for ``.beton`` files.
        write_mode: FFCV image storage, ``raw`` (fastest), ``jpg`` (smallest) or ``smart``.
        max_resolution: longest side stored (``None`` keeps the source size).
        jpeg_quality: JPEG quality when compressing.
        os_cache: memory-map the whole file through the OS cache (best when it fits in RAM).
        order: training sample order: ``random``, ``quasi_random`` (single-process only, for data larger than
            RAM) or ``sequential`` (deterministic; under DDP rank r takes samples r, r+world, ... so the global
            batch equals the single-process one).
        batches_ahead: batches prepared ahead by the loader.
        **kwargs: the shared ``ImageDataModule`` arguments (source, image_size, batch_size...).
    """

    def __init__(
        self,
        cache_dir: str = "~/.cache/visionlab/beton",
        write_mode: str = "raw",
        max_resolution: int | None = None,
        jpeg_quality: int = 90,
        os_cache: bool = True,
        order: str = "random",
        batches_ahead: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if write_mode not in {"raw", "jpg", "smart"}:
            raise ConfigError(f"data.write_mode '{write_mode}' is not one of raw, jpg, smart")
        if order not in {"random", "quasi_random", "sequential"}:
            raise ConfigError(f"data.order '{order}' is not one of random, quasi_random, sequential")
        self.cache_dir = Path(cache_dir).expanduser()
        self.write_mode, self.max_resolution, self.jpeg_quality = write_mode, max_resolution, jpeg_quality
        self.os_cache, self.order, self.batches_ahead = os_cache, order, batches_ahead

    def beton_path(self, split: str) -> Path:
        prints = [self.get_source(s).fingerprint for s in ("train", "val")]
        key = json.dumps([prints, self.write_mode, self.max_resolution, self.jpeg_quality])
        name = "embedded" if self.is_embedded else Path(self.source).name
        return self.cache_dir / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}" / f"{split}.beton"

    def prepare_data(self) -> None:
        _require_ffcv()
        for split in ("train", "val"):
            path, source = self.beton_path(split), self.get_source(split)
            if path.exists():
                check_beton(path, len(source))
                continue
            write_beton(source, path, self.write_mode, self.max_resolution, self.jpeg_quality, self.num_workers)

    def setup(self, stage: str) -> None:
        _require_ffcv()
        for split in ("train", "val"):
            path = self.beton_path(split)
            if not path.exists():
                raise ConfigError(f"{path} is missing: call prepare_data() first (the Trainer does)")
            check_beton(path, len(self.get_source(split)))

    def _distributed(self) -> bool:
        trainer = self.trainer
        return bool(trainer is not None and trainer.world_size > 1)

    def pipelines(self, split: str, train: bool) -> dict:
        """FFCV pipelines per output field: train (RRC+flip) or eval (centre crop) images, and labels."""
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

        hp, size = self.hparams, (self.image_size, self.image_size)
        if train:
            image_pipeline = [RandomResizedCropRGBImageDecoder(size, scale=tuple(hp.rrc_scale), ratio=tuple(hp.rrc_ratio))]
            if hp.hflip:
                image_pipeline.append(RandomHorizontalFlip())
        else:
            image_pipeline = [CenterCropRGBImageDecoder(size, ratio=hp.val_crop_ratio)]
        image_pipeline += [ToTensor(), ToTorchImage(channels_last=False)]
        return {"image": image_pipeline, "label": [IntDecoder(), ToTensor(), Squeeze()]}

    def make_loader(self, split: str, train: bool, indices=None):
        """An ``ffcv.loader.Loader`` over ``split`` with the ``pipelines`` of ``split``/``train``."""
        from ffcv.loader import Loader, OrderOption

        order = OrderOption.SEQUENTIAL
        if train and self.order == "random":
            order = OrderOption.RANDOM
        elif train and self.order == "quasi_random":
            order = OrderOption.RANDOM if self._distributed() else OrderOption.QUASI_RANDOM
        return _Loader(Loader(
            str(self.beton_path(split)),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            os_cache=self.os_cache,
            order=order,
            distributed=self._distributed(),
            seed=self.seed,
            indices=indices,
            pipelines=self.pipelines(split, train),
            drop_last=train,
            batches_ahead=self.batches_ahead,
        ))

    def train_dataloader(self):
        return self.make_loader("train", train=True)

    def val_dataloader(self):
        return self.make_loader("val", train=False)
