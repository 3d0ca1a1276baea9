"""The FFCV loader back-end: writes ``.beton`` files once into a cache, then loads them with ``ffcv.loader.Loader``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datamodules.backend import EpochStart, LoaderBackend
from datamodules.beton import WriteSettings, loader_threads
from datamodules.ffcv_epochs import CheckedLoader
from datamodules.numba_cache import cache_typed_dict
from datamodules.prepared import MANIFEST, SPLITS, check_prepared, complete_manifest, read_manifest, write_prepared
from modules.components.errors import ConfigError


def _require_ffcv():
    cache_typed_dict()  # before FFCV's import compiles numba's typed dict
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "ffcv is not installed: run scripts/setup.sh, or set data.init_args.loader to datamodules.torchvision_loader.TorchvisionLoader"
        ) from err


class FFCVLoader(LoaderBackend):
    """The ``ImageDataModule``'s splits through FFCV: random-resized-crop + flip for train, centre crop for val.

    The ``.beton`` files come from a prepared folder (``prepared``, written by ``visionlab prepare-data``) or
    are written once into ``cache_dir/<name>-<key>/`` where the key covers the source path, the data
    selection and the write settings. Either folder holds a ``manifest.json`` (see ``datamodules/prepared.py``);
    once it exists a run trusts it without listing the source tree, so a restart costs O(1) file-system calls
    and, with ``prepared``, needs no source at all. After changing files in a source tree, set
    ``verify_source`` (re-lists it and rewrites on a change) or prepare again. Under DDP the loader shards with
    ``distributed=True``; the cache is written by one process per shared file system (``cache_shared``).

    Args:
        cache_dir: folder for ``.beton`` files written by ``fit``.
        prepared: a folder written by ``visionlab prepare-data``; ``source`` is then not read.
        write_mode: FFCV image storage ``raw``, ``jpg``, ``smart`` or ``proportion``; ``None`` picks ``raw`` for
            the embedded Fashion-MNIST (28 px: 2.4 KB/image) and, for image folders, the ffcv-imagenet recipe
            (``proportion``, half the images JPEG at quality 90, at most 500 px), as raw ImageNet is ~hundreds of GB.
        max_resolution: longest side stored (``None``: the source size; 500 with ``write_mode: null`` on folders).
        jpeg_quality: JPEG quality when compressing.
        compress_probability: share of JPEG images in ``proportion`` mode.
        write_workers: writer processes (default: the cores available).
        skip_unreadable: leave unreadable images out of the files (counted in the manifest) instead of failing.
        verify_source: re-list the source on each run and rewrite the cache when it changed.
        cache_shared: ``cache_dir`` is on a file system every node sees, so only global rank 0 writes it
            (Lightning's ``prepare_data_per_node = False``); set false for a node-local cache.
        os_cache: memory-map the whole file through the OS cache (best when it fits in RAM).
        order: training sample order: ``random``, ``quasi_random`` (single-process only, for data larger than
            RAM) or ``sequential`` (deterministic; under DDP rank r takes samples r, r+world, ... so the global
            batch equals the single-process one).
        repeated_augmentation: each training image appears this many times per epoch (DeiT's repeated
            augmentation), the copies spread over consecutive ranks; 1 disables. Epoch length is unchanged.
        batches_ahead: batches prepared ahead by the loader.
        seeded_augmentation: draw each training sample's random-resized crop and flip from a stream seeded by
            ``data.augment_seed`` (default ``data.seed``), rank, epoch and position in the epoch, so a run repeats
            crop for crop (``datamodules/ffcv_ops.py``). FFCV's own decoder and flip, the reference behaviour, draw
            from numba's unseeded per-thread RNG: the same distribution, other crops on every run. False restores them.
    """

    def __init__(
        self,
        cache_dir: str = "~/.cache/visionlab/beton",
        prepared: str | None = None,
        write_mode: str | None = None,
        max_resolution: int | None = None,
        jpeg_quality: int = 90,
        compress_probability: float = 0.5,
        write_workers: int | None = None,
        skip_unreadable: bool = False,
        verify_source: bool = False,
        cache_shared: bool = True,
        os_cache: bool = True,
        order: str = "random",
        repeated_augmentation: int = 1,
        batches_ahead: int = 3,
        seeded_augmentation: bool = True,
    ):
        self.prepared = Path(prepared).expanduser() if prepared else None
        self._manifest = read_manifest(self.prepared) if self.prepared else None
        if order not in {"random", "quasi_random", "sequential"}:
            raise ConfigError(f"data.loader.order '{order}' is not one of random, quasi_random, sequential")
        if repeated_augmentation < 1:
            raise ConfigError(f"data.loader.repeated_augmentation {repeated_augmentation} must be at least 1")
        self._write_args = (write_mode, max_resolution, jpeg_quality, compress_probability)
        self.cache_dir = Path(cache_dir).expanduser()
        self.write_workers, self.skip_unreadable, self.verify_source = write_workers, skip_unreadable, verify_source
        self.prepare_data_per_node = not cache_shared
        self.os_cache, self.order, self.batches_ahead = os_cache, order, batches_ahead
        self.repeated_augmentation = repeated_augmentation
        self.seeded_augmentation = seeded_augmentation

    def bind(self, datamodule) -> None:
        super().bind(datamodule)
        write_mode, max_resolution, jpeg_quality, compress_probability = self._write_args
        if write_mode is None and not datamodule.is_embedded:
            write_mode, max_resolution = "proportion", max_resolution or 500
        self.settings = WriteSettings(write_mode or "raw", max_resolution, jpeg_quality, compress_probability)
        self.write_mode, self.max_resolution, self.jpeg_quality = self.settings.write_mode, max_resolution, jpeg_quality

    # --- prepared files --------------------------------------------------------------------------
    def selection(self) -> dict:
        """What decides the samples and labels (recorded in the manifest)."""
        return {**self.datamodule.sample_selection(), "skip_unreadable": self.skip_unreadable}

    def class_names(self) -> list[str] | None:
        if self._manifest is None:
            return None
        recorded, splits = self._manifest["selection"], self._manifest["splits"]
        for key in ("classes", "train_limit", "val_limit"):
            mine = list(self.datamodule.classes or []) if key == "classes" else self.datamodule.hparams[key]
            theirs = list(recorded[key] or []) if key == "classes" else recorded[key]
            if key != "classes" and mine is not None and mine >= splits[key[:-6]]["samples"]:
                continue  # a limit above the prepared count keeps everything either way
            if mine not in (None, [], theirs):
                raise ConfigError(f"data.{key} is {mine} but {self.prepared} was prepared with {theirs}: "
                                  "prepare again with this setting or drop it from the config")
        return list(self._manifest["class_names"])

    def folder(self) -> Path:
        """The folder of this data's ``.beton`` files and manifest."""
        if self.prepared is not None:
            return self.prepared
        key = json.dumps([self.selection(), self.settings.as_dict()], sort_keys=True)
        name = "embedded" if self.datamodule.is_embedded else Path(self.datamodule.source).name
        return self.cache_dir / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def beton_path(self, split: str) -> Path:
        if split in self.datamodule.extra_eval:
            return self.extra_folder(split) / "val.beton"
        return self.folder() / f"{split}.beton"

    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = read_manifest(self.folder())
        return self._manifest

    def write_prepared(self, folder: Path | None = None) -> dict:
        """Write both splits and the manifest into ``folder`` (default: the cache folder), listing the source;
        then the ``extra_eval`` sets that are not written yet (``extra_folder``)."""
        if self.prepared is not None:
            raise ConfigError(f"data.loader.prepared is set ({self.prepared}): the files are read from there, not written")
        folder = Path(folder) if folder is not None else self.folder()
        dm = self.datamodule
        names = [str(n) for n in dm.class_names]
        description = {"selection": self.selection(), "source_fingerprint": {s: dm.get_source(s).fingerprint for s in SPLITS}}
        self._manifest = write_prepared(folder, {s: dm.get_source(s) for s in SPLITS}, names, self.settings,
                                        description, self.write_workers, self.skip_unreadable)
        self._prepare_extras(folder)
        return self._manifest

    def prepare_data(self) -> None:
        _require_ffcv()
        if self.prepared is not None:
            check_prepared(self.prepared, self.manifest())
            return self._prepare_extras(self.prepared)
        folder = self.folder()
        manifest = complete_manifest(folder)
        if manifest is not None and self.verify_source:
            current = {s: self.datamodule.get_source(s).fingerprint for s in SPLITS}
            manifest = manifest if manifest["source_fingerprint"] == current else None
        if manifest is None:
            self.write_prepared(folder)
        self._prepare_extras(folder)

    def setup(self, stage: str) -> None:
        _require_ffcv()
        folder = self.folder()
        if not (folder / MANIFEST).is_file():
            raise ConfigError(f"{folder / MANIFEST} is missing: call prepare_data() first (the Trainer does); "
                              "with a cache_dir local to each node set data.loader.cache_shared false")
        self._manifest = None
        check_prepared(folder, self.manifest())
        for name in self.datamodule.extra_eval:
            check_prepared(self.extra_folder(name), read_manifest(self.extra_folder(name)))

    # --- extra evaluation sets (data.extra_eval) -------------------------------------------------
    def source_classes(self) -> list[str] | None:
        if self.prepared is None:
            return None
        manifest = self.manifest()
        if manifest["selection"]["classes"]:
            raise ConfigError(f"{self.prepared} was prepared with data.classes, so the full class list that names "
                              "data.extra_eval's folders is unknown: prepare without data.classes, or from the source")
        return list(manifest["classes"])

    def _extra_selection(self, name: str) -> dict:
        dm = self.datamodule
        classes = "\n".join(dm.source_classes())
        return {"source": str(Path(dm.extra_eval[name]).expanduser().resolve()), "classes": dm.classes,
                "val_limit": dm.hparams.val_limit, "seed": dm.seed,
                "source_classes": hashlib.sha1(classes.encode()).hexdigest()}

    def extra_folder(self, name: str, root: Path | None = None) -> Path:
        """The folder of extra set ``name``'s ``val.beton`` and manifest: inside this data's folder (``root``),
        keyed by the set's path, the class selection and the write settings."""
        key = json.dumps([self._extra_selection(name), self.settings.as_dict()], sort_keys=True)
        return Path(root or self.folder()) / f"eval-{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def _prepare_extras(self, root: Path) -> None:
        """Write each extra set whose folder under ``root`` has no complete manifest (or, with
        ``verify_source``, whose images changed)."""
        dm = self.datamodule
        for name in dm.extra_eval:
            folder = self.extra_folder(name, root)
            manifest = complete_manifest(folder)
            if manifest is not None and self.verify_source:
                manifest = manifest if manifest["source_fingerprint"] == {"val": dm.get_source(name).fingerprint} else None
            if manifest is None:
                source = dm.get_source(name)
                description = {"selection": self._extra_selection(name), "source_fingerprint": {"val": source.fingerprint}}
                write_prepared(folder, {"val": source}, [str(n) for n in dm.class_names], self.settings, description,
                               self.write_workers, self.skip_unreadable)

    def _distributed(self) -> bool:
        trainer = self.datamodule.trainer
        return bool(trainer is not None and trainer.world_size > 1)

    def pipelines(self, split: str, train: bool, seed=None) -> dict:
        """FFCV pipelines per output field: train (RRC+flip) or eval (centre crop) images, labels, and the
        sample's ``.beton`` index when ``yields_index``; with ``full_train_images`` the ``train`` split is whole
        images (``SimpleRGBImageDecoder``, or ``CenterCropRGBImageDecoder`` at the transform's ``decode_size``)
        with their index. ``seed`` (an ``AugmentationSeed``) makes the training crops and flips seeded."""
        from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder,
                                          SimpleRGBImageDecoder)
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

        from datamodules.ffcv_ops import index_pipeline, seeded_random_resized_crop  # numba: with FFCV only

        dm = self.datamodule
        hp, size = dm.hparams, (dm.image_size, dm.image_size)
        if split == "train" and dm.full_train_images:
            decode_size = dm.batches.decode_size
            if decode_size is None:
                decoder = SimpleRGBImageDecoder()
            else:
                decoder = CenterCropRGBImageDecoder((decode_size, decode_size), ratio=1.0)
            return {"image": [decoder, ToTensor(), ToTorchImage(channels_last=False)],
                    "label": [IntDecoder(), ToTensor(), Squeeze()], "index": index_pipeline()}
        if train and seed is not None:
            image_pipeline = [seeded_random_resized_crop(size, tuple(hp.rrc_scale), tuple(hp.rrc_ratio),
                                                         0.5 if hp.hflip else 0.0, seed)]
        elif train:
            image_pipeline = [RandomResizedCropRGBImageDecoder(size, scale=tuple(hp.rrc_scale), ratio=tuple(hp.rrc_ratio))]
            if hp.hflip:
                image_pipeline.append(RandomHorizontalFlip())
        else:
            image_pipeline = [CenterCropRGBImageDecoder(size, ratio=hp.val_crop_ratio)]
        image_pipeline += [ToTensor(), ToTorchImage(channels_last=False)]
        pipelines = {"image": image_pipeline, "label": [IntDecoder(), ToTensor(), Squeeze()]}
        return {**pipelines, "index": index_pipeline()} if dm.yields_index else pipelines

    def split_loader(self, split: str, train: bool, indices=None):
        """An ``ffcv.loader.Loader`` over ``split`` with the ``pipelines`` of ``split``/``train``."""
        try:
            return self._make_loader(split, train, indices)
        except TypeError as err:
            if not self.datamodule.full_train_images or "constant image" not in str(err):
                raise
            raise ConfigError("training images differ in size: set data.init_args.batches.init_args.decode_size "
                              "(e.g. 256) to decode them at one size") from err

    def _make_loader(self, split: str, train: bool, indices=None):
        from ffcv.loader import Loader, OrderOption

        from datamodules.ffcv_ops import AugmentationSeed

        order = OrderOption.SEQUENTIAL
        distributed = self._distributed()
        trainer = self.datamodule.trainer
        seed = AugmentationSeed(self.datamodule.augment.seed, trainer.global_rank if distributed else 0) \
            if train and self.seeded_augmentation else None
        if train and self.repeated_augmentation > 1:
            from datamodules.repeated import repeated_traversal

            rank, world = (trainer.global_rank, trainer.world_size) if distributed else (0, 1)
            order, distributed = repeated_traversal(self.repeated_augmentation, rank, world), False  # sharded by the order
        elif train and self.order == "random":
            order = OrderOption.RANDOM
        elif train and self.order == "quasi_random":
            order = OrderOption.RANDOM if self._distributed() else OrderOption.QUASI_RANDOM
        loader = Loader(
            str(self.beton_path(split)),
            batch_size=self.datamodule.batch_size,
            num_workers=loader_threads(self.datamodule.num_workers),
            os_cache=self.os_cache,
            order=order,
            distributed=distributed,
            seed=self.datamodule.seed,
            indices=indices,
            pipelines=self.pipelines(split, train, seed),
            drop_last=train,
            batches_ahead=self.batches_ahead,
        )
        if not train:
            return CheckedLoader(loader, str(self.beton_path(split)), seed)
        loader.traversal_order = order = ResumableOrder(loader.traversal_order)  # after Loader measured its length
        return ResumableLoader(loader, str(self.beton_path(split)), seed, lambda: order.epoch,
                               datamodule=self.datamodule, order=order)

    def decoded_pixels(self, decode_size: int | None) -> str:
        if self.write_mode == "raw" and self.max_resolution is None and decode_size is None:
            return "source"
        quality = self.jpeg_quality if self.write_mode != "raw" else None
        return f"ffcv {self.write_mode} q{quality} max{self.max_resolution} centre{decode_size}"

    def num_train_samples(self) -> int:
        from ffcv.reader import Reader

        return int(Reader(str(self.beton_path("train"))).num_samples)



class ResumableOrder:
    """An FFCV traversal order that serves ``order``'s sample order of ``epoch`` (set by ``ResumableLoader``: the
    trainer's epoch, not the count of epochs this ``Loader`` ran) without its first ``skip`` samples."""

    def __init__(self, order):
        self.order, self.epoch, self.skip = order, 0, 0
        # ffcv 1.0.2's QuasiRandom shuffles its page table in place on every call, so its order for an epoch also
        # depended on how many epochs this process had drawn before: each epoch now draws from the same table.
        table = getattr(order, "page_to_samples_array", None)
        self._table = None if table is None else table.copy()

    def sample_order(self, epoch: int):
        if self._table is not None:
            self.order.page_to_samples_array[...] = self._table
        return self.order.sample_order(self.epoch)[self.skip:]


class ResumableLoader(CheckedLoader):
    """A training ``CheckedLoader`` that starts each epoch at its first batch, where the DataModule says which
    epoch it is and how many batches a resumed run already trained on (``LoaderBackend``'s resume contract):
    ``ResumableOrder`` drops those batches' samples; the seeded crops draw from the epoch's seed, the batch's
    samples and each one's place in the batch (``datamodules/ffcv_ops.py``), so the batches that remain are
    decoded as they would have been."""

    def __init__(self, *args, datamodule, order: ResumableOrder, **kwargs):
        super().__init__(*args, **kwargs)
        self.datamodule, self.order = datamodule, order

    def __iter__(self):
        return EpochStart(self._start_epoch)

    def _start_epoch(self):
        self.order.epoch, skip = self.datamodule.train_epoch_start(self.started)
        if skip >= len(self):  # FFCV cannot start an epoch of no samples (its page table of none fails)
            self.started += 1
            return iter(())
        self.order.skip = skip * self.loader.batch_size
        return super().__iter__()
