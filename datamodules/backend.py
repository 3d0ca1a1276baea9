"""The loader back-end interface of ``datamodules.base.ImageDataModule`` (FFCV and torchvision implement it)."""

from __future__ import annotations


class LoaderBackend:
    """How an ``ImageDataModule``'s splits become loaders: ``datamodules.ffcv_loader.FFCVLoader`` (``.beton`` files,
    the default) or ``datamodules.torchvision_loader.TorchvisionLoader``, chosen by ``class_path``.

    ``bind`` gives it its DataModule (sources, sizes, crops, ``batches``) once the source is known; the DataModule
    then calls ``prepare_data``/``setup`` from its own and asks ``split_loader`` for every loader. A loader yields
    ``(uint8 (B, 3, H, W) images, labels[, indices])``: the crops of ``rrc_scale``/``rrc_ratio``/``hflip`` for
    training, the ``val_crop_ratio`` centre crop otherwise, the sample's index when ``datamodule.yields_index``
    and whole images in index order for ``datamodule.full_train_images`` transforms.
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

    def decoded_pixels(self, decode_size: int | None) -> str:
        """``source`` when whole training images are the source's own pixels (lossless, the same through every
        back-end), else a description of the lossy or resizing decode (recorded with stored logits)."""
        raise NotImplementedError


def default_loader() -> LoaderBackend:
    """The FFCV back-end with its defaults (``data.loader`` unset)."""
    from datamodules.ffcv_loader import FFCVLoader

    return FFCVLoader()
