"""visionlab's image DataModule: sources, splits and device-side batches; a loader back-end (FFCV | torchvision)
turns splits into loaders and an optional batch transform (captions, replayed crops) adds keys to each batch."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from datamodules import sources
from datamodules.augment import DeviceAugment
from datamodules.backend import LoaderBackend, TrainPosition
from modules.components.errors import ConfigError
from modules.components.parts import Part, record

EMBEDDED = "fashion_mnist"


#: what the back-ends' loaders yield, in this order (``index`` only when asked for): named by ``loader_batch``
LOADER_FIELDS = ("image", "label", "index")


def loader_batch(batch) -> dict:
    """A back-end loader's ``(uint8 images, labels[, indices])`` by name; dicts (already named) pass through."""
    if isinstance(batch, dict):
        return dict(batch)
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise ValueError(f"a loader batch is a dict or ({', '.join(LOADER_FIELDS)}[, index]), not a "
                         f"{type(batch).__name__} of {len(batch) if isinstance(batch, (list, tuple)) else 1} items")
    return dict(zip(LOADER_FIELDS, batch))


class BatchTransform(Part):
    """What a DataModule's ``batches`` makes of each transferred batch: captions (``datamodules/captions.py``),
    replayed stored crops and logits (``datamodules/replay.py``).

    ``bind`` is called once the DataModule knows its classes, ``setup`` from its ``setup``, and the transform
    then maps every transferred loader batch, a dict ``image`` (uint8 (B, 3, H, W)), ``label`` (B,) and, when
    the loaders yield it, ``index`` (B,), to the dict the technique receives (``prepare_batch`` normalises).
    """

    #: the loaders must yield each sample's ``index`` (its position in ``get_source(split)``)
    yields_index = False
    #: the training split is served as whole decoded images with their ``index`` (no random crop or flip), as
    #: stored or, with ``decode_size``, as their centre square resized to that side: the transform crops them
    full_train_images = False
    decode_size: int | None = None

    def bind(self, datamodule) -> None:
        """Called once by the DataModule after its classes are known."""

    def setup(self, datamodule, stage: str) -> None:
        """Called at the end of the DataModule's ``setup``."""

    def __call__(self, datamodule, batch: dict, training: bool) -> dict:
        raise NotImplementedError


class ImageDataModule(pl.LightningDataModule):
    """Labelled images from the embedded Fashion-MNIST or any ImageFolder tree, through an injected loader back-end.

    Batches leave the loader as uint8 ``(B, 3, H, W)``; ``on_after_batch_transfer`` augments training batches
    on the device (``batch_augment``, ``normalized_augment``) and normalises, so both loader back-ends and
    every technique get the same recipes. Techniques receive a dict: ``image`` (normalised float), ``label``
    (int64), ``index`` when the loaders yield it, and the keys ``batches`` adds.

    Args:
        source: ``fashion_mnist`` (the embedded default) or the path of an ImageFolder tree.
        loader: the loader back-end by ``class_path``: ``datamodules.ffcv_loader.FFCVLoader`` (default; its
            settings are the ``.beton`` cache, write mode, order...) or ``datamodules.torchvision_loader.TorchvisionLoader``.
        image_size: output crop size (linked into the model).
        batch_size: per-device batch size.
        num_workers: loader worker processes/threads.
        classes: keep only these class indices (relabelled 0..k-1 in this order), e.g. for transfer.
        train_limit: keep at most this many training samples (seeded subset), ``None`` for all.
        val_limit: same for validation.
        val_fraction: validation share when an ImageFolder has no ``train/``/``val/`` split.
        seed: seed of subsets, splits and shuffling.
        rrc_scale: random-resized-crop area range for training.
        rrc_ratio: random-resized-crop aspect-ratio range.
        hflip: random horizontal flips for training.
        val_crop_ratio: validation centre crop = this fraction of the short side, then resized.
        mean: normalisation mean (0..1 scale).
        std: normalisation std (0..1 scale).
        fashion_mnist_dir: where Debian's ``dataset-fashion-mnist`` put the IDX files.
        class_index: synset -> index map fixing every class folder's label (see ``datamodules/imagenet.py``).
        val_labels: labels file of a flat ``val/`` folder (ILSVRC ground truth, ``file label`` lines or CSV).
        class_names_file: synset -> human name; the names are ``class_names`` (prompts, captions).
        batch_augment: kornia modules on the training batch as 0..1 floats before normalisation, e.g.
            ``datamodules.augment.RandAugment``, ``kornia.augmentation.ColorJitter``; parameters per sample.
        normalized_augment: modules on the normalised training batch, e.g.
            ``datamodules.augment.NormalizedRandomErasing``.
        augment_seed: seed of the device augmentation and of FFCV's seeded crops and flips (default ``seed``);
            draws depend on (seed, rank, epoch, step) only, so a rerun repeats them whatever the model consumes from
            the global RNG.
        holdout_fraction: share of the training split held out for model-soup selection (``holdout_split``).
        batches: what each transferred batch becomes, chosen by ``class_path`` (``datamodules.captions.ClassPrompts``
            or ``CaptionsFile``, ``datamodules.replay.StoredCrops``); ``None``: ``{image, label[, index]}``.
        extra_eval: more evaluation sets, ``{name: ImageFolder path}`` (e.g. ``{imagenet_v2: /data/v2}``), each
            class folder named as a training class or by its index; served after ``val`` by ``val_dataloader``
            with validation transforms (and the ``classes``/``val_limit`` selection), logged as
            ``val_<name>/...``.
    """

    def __init__(
        self,
        source: str = EMBEDDED,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 2,
        classes: Sequence[int] | None = None,
        train_limit: int | None = None,
        val_limit: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        rrc_scale: tuple[float, float] = (0.08, 1.0),
        rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        val_crop_ratio: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        fashion_mnist_dir: str = sources.FASHION_MNIST_DIR,
        class_index: str | None = None,
        val_labels: str | None = None,
        class_names_file: str | None = None,
        batch_augment: list[nn.Module] | None = None,
        normalized_augment: list[nn.Module] | None = None,
        augment_seed: int | None = None,
        holdout_fraction: float = 0.0,
        extra_eval: dict[str, str] | None = None,
        batches: BatchTransform | None = None,
        loader: LoaderBackend | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["batch_augment", "normalized_augment", "batches", "loader"])
        self.extra_eval = dict(extra_eval or {})
        for name in self.extra_eval:
            if not name.isidentifier() or name in {"train", "val", "raw"}:
                raise ConfigError(f"data.extra_eval name {name!r} must be an identifier other than train, val, raw "
                                  "(it names the log keys val_<name>/...)")
        self.source = source
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.classes = list(classes) if classes else None
        self.seed = seed
        self._sources: dict[str, object] = {}
        if loader is None:  # the FFCV back-end with its defaults (imported here: FFCV is a heavy import)
            from datamodules.ffcv_loader import FFCVLoader

            loader = FFCVLoader()
        self.loader = loader
        self.loader.bind(self)
        self.prepare_data_per_node = self.loader.prepare_data_per_node
        self.class_names = self._class_names()
        self.set_normalization(mean, std)
        self.augment = DeviceAugment(batch_augment or [], normalized_augment or [],
                                     seed if augment_seed is None else augment_seed)
        self.batches = batches
        # The injected parts, recorded by the part contract (the CLI has recorded its class_path dicts already).
        for name, value in (("loader", self.loader), ("batches", batches), ("batch_augment", batch_augment),
                            ("normalized_augment", normalized_augment)):
            if not isinstance(self.hparams.get(name), (dict, list)) or name not in self.hparams:
                self.hparams[name] = record(value)
        if batches is not None:
            batches.bind(self)
        self._resume: TrainPosition | None = None  # from a checkpoint, until the training epoch it is in starts

    # --- sources ---------------------------------------------------------------------------------
    @property
    def is_embedded(self) -> bool:
        return self.source == EMBEDDED

    def _class_names(self) -> list[str]:
        known = self.loader.class_names()
        if known is not None:
            return known
        if self.is_embedded:
            names = sources.FASHION_MNIST_CLASSES
        else:
            if not Path(self.source).expanduser().is_dir():
                raise ConfigError(f"data path {self.source} does not exist or is not a folder: set data.source to an ImageFolder tree or '{EMBEDDED}'")
            names = sources.folder_classes(self.source, self.hparams.class_index)
        if self.hparams.class_names_file:
            from datamodules.imagenet import read_class_names

            readable = read_class_names(self.hparams.class_names_file)
            names = [readable.get(name, name) for name in names]
        if self.classes:
            bad = [c for c in self.classes if not 0 <= c < len(names)]
            if bad:
                raise ConfigError(f"data.classes {bad} out of range: the source has {len(names)} classes")
            names = [names[c] for c in self.classes]
        return list(names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def source_classes(self) -> list[str]:
        """Class names of the source before any ``classes`` selection (what extra sets' folders are named)."""
        known = self.loader.source_classes()
        if known is not None:
            return known
        return list(sources.FASHION_MNIST_CLASSES) if self.is_embedded else sources.folder_classes(self.source, self.hparams.class_index)

    def eval_sets(self) -> list[str]:
        """Evaluation splits in ``val_dataloader`` order: ``val``, then the ``extra_eval`` names."""
        return ["val", *self.extra_eval]

    def get_source(self, split: str):
        """The (cached) source of ``split`` ('train', 'val' or an ``extra_eval`` name), after class/limit restriction."""
        if split not in self._sources:
            hp = self.hparams
            if split in self.extra_eval:
                raw = sources.labelled_folder(self.extra_eval[split], self.source_classes())
                self._sources[split] = sources.restrict(raw, self.classes, hp.val_limit, self.seed, f"eval-{split}")
                return self._sources[split]
            if self.is_embedded:
                raw = sources.fashion_mnist(split, hp.fashion_mnist_dir)
            else:
                raw = sources.image_folder(self.source, split, hp.val_fraction, self.seed, hp.class_index, hp.val_labels)
            limit = hp.train_limit if split == "train" else hp.val_limit
            self._sources[split] = sources.restrict(raw, self.classes, limit, self.seed, split)
        return self._sources[split]

    # --- held-out split of the training data (model-soup selection) ------------------------------
    def num_train_samples(self) -> int:
        known = self.loader.num_train_samples()
        return len(self.get_source("train")) if known is None else known

    def holdout_split(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(training indices, held-out indices): a seeded ``holdout_fraction`` of the training split.

        Model soups pick ingredients on data carved from the training set (the paper's ImageNet2p, 2% of
        ImageNet train), never on the split whose accuracy is reported. With ``holdout_fraction: 0`` the
        training indices are ``None`` (all of them).
        """
        fraction = self.hparams.holdout_fraction
        if not 0 <= fraction < 1:
            raise ConfigError(f"data.holdout_fraction {fraction} must be in [0, 1)")
        count = self.num_train_samples()
        held = int(round(fraction * count))
        if fraction == 0:
            return None, np.arange(0)
        order = np.random.default_rng(self.seed).permutation(count)
        return np.sort(order[held:]), np.sort(order[:held])

    def holdout_dataloader(self):
        """The held-out training images with validation transforms (``data.holdout_fraction`` > 0)."""
        if not self.hparams.holdout_fraction:
            raise ConfigError("a held-out split is needed (model soups select on data carved from training): set "
                              "data.init_args.holdout_fraction, e.g. 0.02 as the paper's ImageNet2p")
        return self.split_loader("train", train=False, indices=self.holdout_split()[1])

    # --- loaders (the back-end's) ----------------------------------------------------------------
    def prepare_data(self) -> None:
        self.loader.prepare_data()

    def setup(self, stage: str) -> None:
        self.loader.setup(stage)
        if self.batches is not None:
            self.batches.setup(self, stage)

    def split_loader(self, split: str, train: bool, indices=None):
        """A loader over ``split`` (optionally only ``indices``) with train or eval transforms (the back-end's)."""
        return self.loader.split_loader(split, train, indices)

    def train_dataloader(self):
        return self.split_loader("train", train=True, indices=self.holdout_split()[0])

    # --- the position in the training data (sample-exact resume) ---------------------------------
    def train_position(self) -> TrainPosition | None:
        """Where the running fit is in its training data, or ``None`` outside ``fit``.

        ``batches`` is the count of this epoch's batches whose training step has run, which is where Lightning
        resumes a checkpoint saved now (at a batch end, an epoch end or after a validation).
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        progress = trainer.fit_loop.epoch_loop.batch_progress
        batches = progress.current.processed
        complete = bool(progress.is_last_batch) or batches >= trainer.num_training_batches
        return TrainPosition(trainer.current_epoch, batches, self.batch_size, trainer.world_size, complete)

    def sample_selection(self) -> dict:
        """What decides this DataModule's samples and labels: a back-end records it beside its prepared files."""
        hp = self.hparams
        return {"source": str(self.source if self.is_embedded else Path(self.source).expanduser().resolve()),
                "classes": self.classes, "train_limit": hp.train_limit, "val_limit": hp.val_limit,
                "val_fraction": hp.val_fraction, "seed": self.seed, "class_index": hp.class_index,
                "val_labels": hp.val_labels}

    def state_dict(self) -> dict:
        """``{"train_position": TrainPosition.as_dict()}`` (plus the back-end's ``position_state``) during ``fit``
        (Lightning saves it in checkpoints)."""
        position = self.train_position()
        return {} if position is None else {"train_position": {**position.as_dict(),
                                                               **self.loader.position_state(position)}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from a checkpoint's ``train_position``: the first training epoch that starts is checked against
        it (``train_epoch_start``). A position inside an epoch needs the batch size and world size it was saved
        with (the rest of the epoch's order is dealt to ranks in batches of that size); a ConfigError otherwise."""
        saved = state_dict.get("train_position")
        if not saved:
            return
        position = TrainPosition.from_dict(saved)
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if not position.complete and position.batches and (world, self.batch_size) != (position.world_size,
                                                                                          position.batch_size):
            raise ConfigError(
                f"the checkpoint was saved {position.batches} batches into epoch {position.epoch} by "
                f"{position.world_size} process(es) of data.batch_size {position.batch_size}, and this run has {world} "
                f"of {self.batch_size}: the rest of that epoch cannot be dealt out the same way. Resume with "
                f"{position.world_size} process(es) (trainer.num_nodes x trainer.devices) and data.batch_size "
                f"{position.batch_size}, or from a checkpoint saved at an epoch's end "
                "(<default_root_dir>/checkpoints/epoch*.ckpt)")
        self._resume = position
        self.loader.load_position_state(saved)
        # The training loaders are resumable through this state, which Lightning's check (the loader object's own
        # state_dict) does not look at: its "dataloader is not resumable" warning would be wrong here.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def train_epoch_start(self, epochs_started: int) -> tuple[int, int]:
        """``(epoch, skip)`` for a training loader's epoch that starts now (at its first batch): the trainer's
        epoch (``epochs_started``, the loader's own count, without a trainer) and how many of this rank's batches
        of it to leave out: those a resumed checkpoint had trained on, in the epoch it was saved in, else 0."""
        trainer = self.trainer
        if trainer is None or not getattr(trainer, "training", False):
            return epochs_started, 0
        epoch, position = trainer.current_epoch, self._resume
        if position is None or position.epoch != epoch:
            self._resume = None  # kept through its epoch: another pass over the loader in it (a calibration) skips too
            return epoch, 0
        if position.complete:  # skipped whole, whatever its batch count is now
            return epoch, max(position.batches, int(min(trainer.num_training_batches, 2**31)))
        return epoch, position.batches

    # --- batches ---------------------------------------------------------------------------------
    def set_normalization(self, mean, std) -> None:
        """Store mean/std on the 0..255 scale (plain tensors: a DataModule has no buffers; moved per batch)."""
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float32 on the images' device."""
        mean, std = self._mean.to(images.device), self._std.to(images.device)
        return (images.float() - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float -> 0..1 float (for logging)."""
        mean, std = self._mean.to(images.device), self._std.to(images.device)
        return ((images * std + mean) / 255).clamp(0, 1)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """A transferred uint8 batch -> (augmented when training) normalised float; floats pass through."""
        if images.dtype != torch.uint8:
            return images
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            return self.augment(images, self.normalize, rank=trainer.global_rank, epoch=trainer.current_epoch)
        return self.normalize(images)

    @property
    def yields_index(self) -> bool:
        """Whether the loaders add each sample's index (``batches`` asks for it)."""
        return bool(self.batches is not None and self.batches.yields_index)

    def class_prompt_tokens(self) -> torch.Tensor:
        """(C, T, L) prompt token ids of every class and template (zero-shot heads), from a caption ``batches``."""
        if not hasattr(self.batches, "class_prompt_tokens"):
            raise ConfigError("an image-text technique needs captions: set data.init_args.batches to "
                              "datamodules.captions.ClassPrompts or CaptionsFile")
        return self.batches.class_prompt_tokens()

    def prepare_batch(self, batch: dict) -> dict:
        """A named transferred batch with (augmented when training) normalised ``image``, int64 ``label`` and
        ``index``: what techniques receive without ``batches``."""
        out = {**batch, "image": self.prepare_images(batch["image"]), "label": batch["label"].long().view(-1)}
        if "index" in batch:
            out["index"] = batch["index"].long().view(-1)
        return out

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> dict:
        batch = loader_batch(batch)
        if self.batches is not None:
            return self.batches(self, batch, bool(self.trainer is not None and self.trainer.training))
        return self.prepare_batch(batch)

    # --- whole decoded training images (``BatchTransform.full_train_images``) --------------------
    @property
    def full_train_images(self) -> bool:
        """Whether the training split is served as whole decoded images with their index (``batches`` asks)."""
        return bool(self.batches is not None and self.batches.full_train_images)

    def decoded_pixels(self, decode_size: int | None) -> str:
        """What the back-end's whole training images are (``LoaderBackend.decoded_pixels``)."""
        return self.loader.decoded_pixels(decode_size)

    def full_image_loader(self):
        """The training split as whole decoded ``(uint8 images, labels, indices)`` batches in index order, none
        dropped (with a ``full_train_images`` transform)."""
        return self.split_loader("train", train=False)

    def val_dataloader(self):
        """The ``val`` loader, or a list of one loader per ``eval_sets()`` entry when ``extra_eval`` is set."""
        loaders = [self.split_loader(split, train=False) for split in self.eval_sets()]
        return loaders[0] if len(loaders) == 1 else loaders

    def eval_dataloader(self, split: str):
        """``split`` with validation transforms, in order (feature banks, kNN monitors), as dicts ``image``
        (uint8), ``label``[, ``index``] on the host."""
        return NamedBatches(self.split_loader(split, train=False))

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()


class NamedBatches:
    """A back-end loader whose batches are named (``loader_batch``); its length is the loader's."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (loader_batch(batch) for batch in self.loader)
