"""Stored sparse teacher logits (FKD / TinyViT / dataset reinforcement): the on-disk format.

One file per split holds, for N samples x K augmented epochs, the crop box and flip each sample was
augmented with, the teacher's top-k logits on that crop and the log-normaliser of the teacher's tempered
softmax, so that the teacher's full target is rebuilt with its true tail mass (FKD / TinyViT)::

    b"VLSPARSE" | uint64 header length | JSON header | arrays (64-byte aligned, C order) | b"VLSPEND!"

The JSON header holds the metadata (``num_classes``, ``topk``, ``epochs``, ``num_samples``, ``teacher``,
``image_size``, source fingerprint, ...) and, per array, its dtype, shape, offset and CRC-32. Arrays:

* ``crop_boxes``   int16   (N, K, 4): top, left, height, width in pixels of the decoded full image.
* ``flips``        uint8   (N, K):    1 = horizontally flipped after cropping.
* ``topk_values``  float16 (N, K, k): the k largest teacher logits, in descending order.
* ``topk_indices`` uint16  (N, K, k): their class indices (int32 when there are more than 65535 classes).
* ``topk_logsumexp`` float32 (N, K): ``logsumexp(z / T)`` over all C classes at the storing temperature
  ``meta["temperature"]``, with the k stored logits taken as their float16 values, so that
  ``p_i = exp(topk_values_i / T - topk_logsumexp)`` are exactly the teacher's tempered probabilities of the
  stored classes (for the float16 logits) and ``1 - sum(p_i)`` is the teacher's true remainder mass.

Quantisation: logits are rounded once to float16 (11 significant bits: relative error <= 2**-11, range
+-65504) when written; what is read back is bit-identical to that float16 array. Format 1 files (top-k
logits without ``topk_logsumexp``) cannot rebuild the remainder and are refused. Files are written to a
temporary file in the same folder, fsynced and renamed (``os.replace``), so an interrupted write never
replaces or corrupts an existing file. Pure numpy: no torch, no Lightning.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modules.components.errors import DataError
from modules.components.files import write_atomic

MAGIC, END = b"VLSPARSE", b"VLSPEND!"
FORMAT_VERSION = 2  # 2: + topk_logsumexp and meta["temperature"] (format 1 lost the tail mass)
ALIGN = 64
ARRAY_NAMES = ("crop_boxes", "flips", "topk_values", "topk_indices", "topk_logsumexp")


@dataclass
class SparseLogits:
    """Per-(sample, epoch) augmentation parameters and top-k teacher logits of one split.

    Attributes:
        crop_boxes: int16 (N, K, 4) top, left, height, width.
        flips: uint8 (N, K).
        topk_values: float16 (N, K, k) teacher logits, descending.
        topk_indices: uint16/int32 (N, K, k) class indices of ``topk_values``.
        topk_logsumexp: float32 (N, K) log-normaliser of the teacher's softmax at ``meta["temperature"]``.
        meta: JSON-serialisable metadata (``num_classes`` is required; the rest is checked by readers).
    """

    crop_boxes: np.ndarray
    flips: np.ndarray
    topk_values: np.ndarray
    topk_indices: np.ndarray
    topk_logsumexp: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.crop_boxes.shape[0])

    @property
    def epochs(self) -> int:
        return int(self.crop_boxes.shape[1])

    @property
    def topk(self) -> int:
        return int(self.topk_values.shape[2])

    @classmethod
    def empty(cls, num_samples: int, epochs: int, topk: int, num_classes: int, meta: dict | None = None,
              temperature: float = 1.0) -> SparseLogits:
        """Zero-filled arrays of the stored dtypes, to be filled batch by batch; the sizes go into ``meta``."""
        index_dtype = np.uint16 if num_classes <= np.iinfo(np.uint16).max + 1 else np.int32
        return cls(
            crop_boxes=np.zeros((num_samples, epochs, 4), np.int16),
            flips=np.zeros((num_samples, epochs), np.uint8),
            topk_values=np.zeros((num_samples, epochs, topk), np.float16),
            topk_indices=np.zeros((num_samples, epochs, topk), index_dtype),
            topk_logsumexp=np.zeros((num_samples, epochs), np.float32),
            meta={**(meta or {}), "num_samples": int(num_samples), "epochs": int(epochs), "topk": int(topk),
                  "num_classes": int(num_classes), "temperature": float(temperature)},
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    def validate(self) -> None:
        """Raise ``ValueError`` when the arrays disagree on shapes or dtypes (a programming error)."""
        n, k_epochs = self.crop_boxes.shape[:2]
        expected = {"crop_boxes": (n, k_epochs, 4), "flips": (n, k_epochs),
                    "topk_values": (n, k_epochs, self.topk), "topk_indices": (n, k_epochs, self.topk),
                    "topk_logsumexp": (n, k_epochs)}
        for name, array in self.arrays().items():
            if array.shape != expected[name]:
                raise ValueError(f"{name} has shape {array.shape}, expected {expected[name]}")
        if (self.topk_values.dtype != np.float16 or self.crop_boxes.dtype != np.int16 or self.flips.dtype != np.uint8
                or self.topk_logsumexp.dtype != np.float32):
            raise ValueError("crop_boxes must be int16, flips uint8, topk_values float16 and topk_logsumexp float32")
        if "num_classes" not in self.meta or "temperature" not in self.meta:
            raise ValueError("meta needs num_classes and temperature")


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _layout(arrays: dict[str, np.ndarray], meta: dict) -> tuple[bytes, list[int]]:
    """The encoded header and each array's absolute offset (the header's length fixes the offsets)."""
    entries = {name: {"dtype": a.dtype.str, "shape": list(a.shape), "crc32": zlib.crc32(np.ascontiguousarray(a).data)}
               for name, a in arrays.items()}
    header_len = 0
    while True:  # offsets depend on the header length, which depends on the offsets' digits
        offset = _aligned(len(MAGIC) + 8 + header_len)
        offsets = []
        for a in arrays.values():
            offsets.append(offset)
            offset = _aligned(offset + a.nbytes)
        for (name, entry), start in zip(entries.items(), offsets):
            entry["offset"] = start
        header = json.dumps({"format": FORMAT_VERSION, "meta": meta, "arrays": entries, "end": offset}).encode()
        if len(header) == header_len:
            return header, offsets
        header_len = len(header)


def save_sparse_logits(logits: SparseLogits, path: str | Path) -> Path:
    """Write ``logits`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    An existing file at ``path`` stays untouched unless the new file was written completely; the temp
    file is removed on any failure, including ``KeyboardInterrupt``.
    """
    logits.validate()
    path = Path(path)
    arrays = {name: np.ascontiguousarray(a) for name, a in logits.arrays().items()}
    header, offsets = _layout(arrays, logits.meta)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(header).to_bytes(8, "little") + header)
            for array, start in zip(arrays.values(), offsets):
                f.write(b"\0" * (start - f.tell()))
                f.write(array.data)
            f.write(b"\0" * (_aligned(f.tell()) - f.tell()) + END)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def load_sparse_logits(path: str | Path, verify: bool = True) -> SparseLogits:
    """Read a file written by ``save_sparse_logits`` (arrays memory-mapped read-only).

    Args:
        path: the ``.vlsl`` file.
        verify: check every array's CRC-32 (reads the whole file once; catches flipped bits).

    Raises:
        DataError: the file is missing, truncated, corrupt or not a sparse-logits file (one-line fix hint).
    """
    path = Path(path)
    fix = f"delete {path} and run `visionlab store-logits` again to rebuild it"
    if not path.is_file():
        raise DataError(f"stored logits {path} not found: run `visionlab store-logits --output {path}` first")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a visionlab sparse-logits file (bad magic)")
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            version = header.get("format")
            if version != FORMAT_VERSION:
                old = isinstance(version, int) and version < FORMAT_VERSION
                why = ("it stores top-k logits without the teacher's log-normaliser, so the teacher's tail mass "
                       "cannot be rebuilt" if old else f"this visionlab reads format {FORMAT_VERSION} only")
                raise DataError(f"{path} is a format {version} sparse-logits file and {why}: {fix}")
            end = int(header["end"])
            if size != end + len(END):
                raise ValueError(f"{size} bytes, the header says {end + len(END)}")
            f.seek(end)
            if f.read(len(END)) != END:
                raise ValueError("end marker missing")
        arrays = {}
        for name in ARRAY_NAMES:
            entry = header["arrays"][name]
            array = np.memmap(path, np.dtype(entry["dtype"]), "r", int(entry["offset"]), tuple(entry["shape"]))
            if verify and zlib.crc32(array.data) != entry["crc32"]:
                raise ValueError(f"{name} fails its CRC-32 check")
            arrays[name] = array
        logits = SparseLogits(**arrays, meta=header["meta"])
        logits.validate()
    except DataError:
        raise
    except Exception as err:  # truncated, garbled header, wrong shapes...
        raise DataError(f"{path} is corrupt or truncated ({type(err).__name__}: {err}): {fix}") from err
    return logits
