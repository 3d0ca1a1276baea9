"""Writing and checking FFCV ``.beton`` files: atomic writes, one-line errors on corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modules.components.errors import DataError
from modules.components.files import write_atomic


def check_beton(path: Path, expected_samples: int | None = None) -> None:
    """Raise ``DataError`` when ``path`` is not a complete, readable ``.beton`` file."""
    from ffcv.reader import Reader

    fix = f"delete {path} and run again to rebuild it from the source"
    size = path.stat().st_size
    try:
        reader = Reader(str(path))
        table = reader.alloc_table
        if len(table) == 0 and reader.num_samples > 0:
            raise ValueError("empty allocation table")
        end = int((table["ptr"].astype(np.int64) + table["size"].astype(np.int64)).max()) if len(table) else 0
    except Exception as err:
        raise DataError(f"{path} is corrupt or truncated ({type(err).__name__}: {err}): {fix}") from err
    if end > size or int(reader.header["alloc_table_ptr"]) > size:
        raise DataError(f"{path} is truncated ({size} bytes, data runs to {end}): {fix}")
    if expected_samples is not None and int(reader.num_samples) != expected_samples:
        raise DataError(f"{path} holds {int(reader.num_samples)} samples, the source has {expected_samples}: {fix}")


class _GuardedDataset:
    """Indexed dataset view for FFCV's writer processes.

    FFCV's writer waits forever when a worker process dies, so a sample that fails to load is replaced by
    a 1x1 placeholder and its error is recorded in ``error_file``; the caller then fails the whole write.
    """

    def __init__(self, source, error_file: Path):
        self.source, self.error_file = source, error_file

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image, label = self.source[index]
            return image, int(label)
        except Exception as err:  # noqa: BLE001 - reported after the write
            with open(self.error_file, "a") as f:
                f.write(f"sample {index}: {err}".replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), 0


def write_beton(source, path: Path, write_mode: str = "raw", max_resolution: int | None = None,
                jpeg_quality: int = 90, num_workers: int = 2) -> Path:
    """Write an image source (``(HWC uint8, label)`` items) to ``path`` as image + label fields, atomically."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    def _write(tmp: Path) -> None:
        errors = tmp.with_suffix(".errors")
        try:
            writer = DatasetWriter(
                str(tmp),
                {
                    "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality),
                    "label": IntField(),
                },
                num_workers=max(1, num_workers),
            )
            writer.from_indexed_dataset(_GuardedDataset(source, errors))
            if errors.exists():
                lines = errors.read_text().splitlines()
                raise DataError(f"{len(lines)} sample(s) could not be read, first: {lines[0]}")
        finally:
            errors.unlink(missing_ok=True)
        check_beton(tmp, len(source))

    return write_atomic(path, _write)
