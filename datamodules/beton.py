"""Writing and checking FFCV ``.beton`` files: atomic writes, one-line errors on corrupt files."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from modules.components.errors import ConfigError, DataError
from modules.components.files import write_atomic

WRITE_MODES = ("raw", "jpg", "smart", "proportion")


@dataclass(frozen=True)
class WriteSettings:
    """How images are stored (FFCV's ``RGBImageField`` arguments).

    Args:
        write_mode: ``raw`` (pixels), ``jpg`` (all JPEG), ``smart`` (JPEG only above a size threshold; with
            FFCV's default threshold: all raw) or ``proportion`` (each image JPEG with ``compress_probability``).
        max_resolution: longest side stored (``None`` keeps the source size).
        jpeg_quality: JPEG quality when compressing.
        compress_probability: share of images JPEG-compressed in ``proportion`` mode.
    """

    write_mode: str = "raw"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5

    def __post_init__(self):
        if self.write_mode not in WRITE_MODES:
            raise ConfigError(f"data.loader.write_mode '{self.write_mode}' is not one of {', '.join(WRITE_MODES)}")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ConfigError(f"data.compress_probability {self.compress_probability} must be within [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"data.jpeg_quality {self.jpeg_quality} must be within 1..100")

    def as_dict(self) -> dict:
        return asdict(self)


def loader_threads(requested: int) -> int:
    """The FFCV ``Loader`` thread count for ``requested`` workers: FFCV hands ``num_workers`` to
    ``numba.set_num_threads``, which refuses more threads than numba started (``NUMBA_NUM_THREADS``, by default
    the CPUs this process may run on), so the count is lowered to that, with a warning. (The threading layer of
    a one-CPU process is chosen in ``datamodules/__init__.py``.)
    """
    import numba

    available = int(numba.config.NUMBA_NUM_THREADS)
    if requested > available:
        warnings.warn(f"visionlab: data.num_workers {requested} > the {available} threads numba may start here (the CPUs "
                      f"this process may use, or NUMBA_NUM_THREADS): the FFCV loaders use {available}", stacklevel=2)
        return available
    return requested


def default_writers() -> int:
    """Writer processes: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def beton_checksum(reader) -> str:
    """SHA-256 of a ``.beton``'s header, field descriptors, per-sample table and allocation table."""
    digest = hashlib.sha256()
    for part in (reader.header, reader.field_descriptors, reader.metadata, reader.alloc_table):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


def check_beton(path: Path, expected_samples: int | None = None, expected_checksum: str | None = None) -> str:
    """Raise ``DataError`` when ``path`` is not a complete, readable ``.beton`` file; return its checksum."""
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
    checksum = beton_checksum(reader)
    if expected_checksum is not None and checksum != expected_checksum:
        raise DataError(f"{path} does not match its manifest (checksum of header and sample tables differs): {fix}")
    return checksum


class _GuardedDataset:
    """Indexed dataset view for FFCV's writer processes.

    FFCV's writer waits forever when a worker process dies, so a sample that fails to load is replaced by
    a 1x1 placeholder and its error is recorded in ``error_file`` as ``index<TAB>message``.

    FFCV's ``proportion`` mode picks JPEG or raw for each image with ``np.random.rand()`` from the writer process's
    global generator, whose state is the parent's at fork time and then depends on which chunks that process took.
    The same source then wrote different files run to run (a val image raw in one, JPEG in the next: pixels off by
    up to 4 levels). Each sample seeds that generator from its source index just before FFCV encodes it (in the
    writer process, after this returns), so the choice is a function of the image alone.
    """

    def __init__(self, source, error_file: Path):
        self.source, self.error_file = source, error_file

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        np.random.seed(int(index) % 2**32)  # FFCV's proportion-mode draw for this image follows (see above)
        try:
            image, label = self.source[index]
            return image, int(label)
        except Exception as err:  # noqa: BLE001 - reported after the write
            with open(self.error_file, "a") as f:
                f.write(f"{index}\t{err}".replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), 0


def estimate_seconds(source, writers: int, probe: int = 16) -> float:
    """Seconds to write ``source`` with ``writers`` processes, from decoding ``probe`` images here."""
    count = min(probe, len(source))
    if count == 0:
        return 0.0
    picks = np.linspace(0, len(source) - 1, count).astype(int)
    start = time.perf_counter()
    for index in picks:
        try:
            source[int(index)]
        except Exception:  # noqa: BLE001 - the write reports unreadable files
            pass
    return (time.perf_counter() - start) / count * len(source) / max(1, writers)


def write_beton(source, path: Path, settings: WriteSettings = WriteSettings(), num_workers: int | None = None,
                skip_unreadable: bool = False) -> tuple[Path, list[str]]:
    """Write an image source (``(HWC uint8, label)`` items) to ``path`` as image + label fields, atomically.

    An unreadable image fails the write with a ``DataError`` naming it, or with ``skip_unreadable`` the file is
    rewritten without such images. Returns the path and the messages of the skipped images.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    skipped: list[str] = []

    def _write(tmp: Path) -> None:
        errors = tmp.with_name(tmp.name + ".errors")

        def write(indices=None) -> None:
            fields = {
                "image": RGBImageField(write_mode=settings.write_mode, max_resolution=settings.max_resolution,
                                       jpeg_quality=settings.jpeg_quality,
                                       compress_probability=settings.compress_probability),
                "label": IntField(),
            }
            writer = DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers or default_writers()))
            writer.from_indexed_dataset(_GuardedDataset(source, errors), indices=indices)

        try:
            write()
            if errors.exists():
                bad = dict(line.split("\t", 1) for line in errors.read_text().splitlines())
                if not skip_unreadable:
                    first = next(iter(bad.items()))
                    raise DataError(f"{len(bad)} image(s) could not be read, first: sample {first[0]}: {first[1]} "
                                    "(set data.skip_unreadable true to leave them out)")
                keep = sorted(set(range(len(source))) - {int(i) for i in bad})
                if not keep:
                    raise DataError(f"none of the {len(source)} images could be read, first: {next(iter(bad.values()))}")
                skipped.extend(bad[i] for i in sorted(bad, key=int))
                errors.unlink()
                write(keep)
        finally:
            errors.unlink(missing_ok=True)
        check_beton(tmp, len(source) - len(skipped))

    return write_atomic(path, _write), skipped
