"""The loader back-end interface of ``datamodules.base.ImageDataModule`` (FFCV and torchvision implement it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from modules.components.parts import Part


class LoaderBackend(Part):
    """How an ``ImageDataModule``'s splits become loaders: ``datamodules.ffcv_loader.FFCVLoader`` (``.beton`` files,
    the default) or ``datamodules.torchvision_loader.TorchvisionLoader``, chosen by ``class_path``.

    ``bind`` gives it its DataModule (sources, sizes, crops, ``batches``) once the source is known; the DataModule
    then calls ``prepare_data``/``setup`` from its own and asks ``split_loader`` for every loader. A loader yields
    ``(uint8 (B, 3, H, W) images, labels[, indices])``: the crops of ``rrc_scale``/``rrc_ratio``/``hflip`` for
    training, the ``val_crop_ratio`` centre crop otherwise, the sample's index when ``datamodule.yields_index``
    and whole images in index order for ``datamodule.full_train_images`` transforms.

    Training loaders (``split_loader(split, train=True)``) resume sample for sample. Each epoch starts at its first
    batch, not at ``iter``: ``iter`` returns an ``EpochStart`` whose first ``next`` calls
    ``datamodule.train_epoch_start(epochs_started)``, which returns ``(epoch, skip)``, and only then starts the
    epoch. The loader must then
    - serve this rank's order for ``epoch`` (the trainer's epoch), a function of the data seed, ``epoch``, rank
      and world size alone (never of how many epochs this process has run);
    - leave out the first ``skip`` batches of that order (``skip * datamodule.batch_size`` samples) without
      reading them: nonzero only in the first epoch after a resume from a checkpoint saved inside it;
    - draw each sample's random crop and flip from (``datamodule.augment.seed``, rank, epoch) and the sample's
      place in this rank's order for the epoch (its position, or its batch's samples and its place in the batch),
      so that leaving out whole batches moves no later draw;
    - keep ``len(loader)`` the whole epoch's batch count (Lightning counts the skipped batches as done).
    The DataModule records the position (``TrainPosition``) in its ``state_dict``, which Lightning saves in every
    checkpoint and gives back to ``load_state_dict`` before the loaders are built. A back-end that serves the
    rank's batches in another order than the rank's (the streaming one's workers serve blocks, interleaved) adds
    which batches have trained through ``position_state`` and reads them back in ``load_position_state``.
    """

    #: Lightning's ``prepare_data_per_node`` for the DataModule (whether every node prepares its own files)
    prepare_data_per_node = True

    def bind(self, datamodule) -> None:
        """Called once by the DataModule, after its source and class selection are set."""
        self.datamodule = datamodule

    def class_names(self) -> list[str] | None:
        """The class names when the back-end knows them without the source (prepared files), else ``None``."""
        return None

    def source_classes(self) -> list[str] | None:
        """Every source class before any ``classes`` selection when the back-end alone knows them, else ``None``."""
        return None

    def num_train_samples(self) -> int | None:
        """Training samples when the back-end counts them without the source, else ``None``."""
        return None

    def prepare_data(self) -> None:
        """Write what the loaders read (once per ``prepare_data_per_node`` scope)."""

    def setup(self, stage: str) -> None:
        """Check or load what the loaders read (every process)."""

    def split_loader(self, split: str, train: bool, indices=None):
        """A loader over ``split`` (optionally only ``indices``, positions in ``get_source(split)``) with train or
        eval crops."""
        raise NotImplementedError

    def position_state(self, position: "TrainPosition") -> dict:
        """Keys the back-end adds to the checkpoint's ``train_position`` (none: the first ``position.batches`` of the
        rank's order are those trained)."""
        return {}

    def load_position_state(self, saved: dict) -> None:
        """A checkpoint's ``train_position`` (with ``position_state``'s keys, if it has them), before the loaders."""

    def decoded_pixels(self, decode_size: int | None) -> str:
        """``source`` when whole training images are the source's own pixels (lossless, the same through every
        back-end), else a description of the lossy or resizing decode (recorded with stored logits)."""
        raise NotImplementedError


@dataclass(frozen=True)
class TrainPosition:
    """Where a fit is in its training data: ``batches`` of this rank's batches of ``epoch`` trained on, each of
    ``batch_size`` samples on each of ``world_size`` ranks; ``complete`` when the epoch's batches are all done.
    Five integers whatever the dataset's size (``ImageDataModule.state_dict``'s ``train_position``)."""

    epoch: int
    batches: int
    batch_size: int
    world_size: int
    complete: bool = False

    @property
    def samples(self) -> int:
        """Samples of the epoch consumed by all ranks together (the global sample stream's position)."""
        return self.batches * self.batch_size * self.world_size

    def as_dict(self) -> dict:
        return {**asdict(self), "samples": self.samples}

    @classmethod
    def from_dict(cls, state: dict) -> "TrainPosition":
        return cls(**{name: state[name] for name in ("epoch", "batches", "batch_size", "world_size", "complete")})


class EpochStart:
    """The iterator a resumable training loader's ``iter`` returns: ``start()`` (which asks the DataModule for the
    epoch and the batches to skip, then starts the back-end's epoch) runs at the first ``next``.

    Lightning calls ``iter`` on the training loader before it has settled the epoch a resumed run is in (it moves a
    run resumed at an epoch's end on to the next epoch after that call); the first batch is asked for after.
    Attributes of the started epoch are read through this object.
    """

    def __init__(self, start: Callable[[], Iterator]):
        self._start, self._epoch = start, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._epoch is None:
            self._epoch = self._start()
        return next(self._epoch)

    def __getattr__(self, name: str):
        epoch = self.__dict__.get("_epoch")
        if epoch is None:
            raise AttributeError(f"{name}: the epoch has not started (no batch taken yet)")
        return getattr(epoch, name)


