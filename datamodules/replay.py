"""Replayable augmentation for stored sparse teacher logits (FKD / TinyViT dataset reinforcement).

The loaders here yield *full* decoded images with their sample index; the random-resized crop and flip
happen on the device, from parameters that are a pure function of ``(seed, sample index, epoch)``. The
``visionlab store-logits`` tool draws those parameters, crops, runs the teacher and stores parameters and
top-k logits; the ``StoredCrops`` batch transform later reads them back and calls the same ``apply_crops`` on
the same decoded pixels, so the student sees bit-for-bit the crop the teacher saw (on the same device type).

* ``sample_crop_params``: torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre crop)
  vectorised over a batch, with uniforms from a counter-based hash instead of a stateful generator.
* ``apply_crops``: one batched kornia ``crop_and_resize`` (bilinear) + flips, uint8 in and out.
* ``StoredCrops``: the batch transform of either back-end (``data.init_args.batches: {class_path:
  datamodules.replay.StoredCrops, init_args: {logits_path: ...}}``); train batches reach the module as a dict
  ``image`` (B, 3, S, S) normalised float, ``label`` (B,), ``index`` (B,), ``topk_values`` (B, k) float32,
  ``topk_indices`` (B, k) int64, ``topk_logsumexp`` (B,) float32 and ``logits_temperature`` (the storing
  temperature, a float); validation batches are the back-end's ``image``/``label``. Training epoch e replays
  stored epoch e % K; with ``crops_per_image = n`` (FKD's region-level soft labels, ``--num_crops``) each
  image of a batch comes n times, as stored epochs ``(e n + j) % K`` for j < n, crop-major: the batch holds
  ``n * batch_size`` crops.
* ``with_stored_crops``: a data config with that transform attached (what ``visionlab store-logits`` walks).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from datamodules.base import BatchTransform, ImageDataModule
from modules.components.errors import ConfigError
from modules.components.kd.sparse_logits import SparseLogits, load_sparse_logits

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
RRC_ATTEMPTS = 10


# --- parameters ------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a fast, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) per sample, a pure function of ``(seed, epoch, index)``: (B, count) float64."""
    key = _splitmix64(np.full(1, seed, np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch))
    key = _splitmix64(key ^ np.asarray(indices, np.uint64).reshape(-1))  # (B,)
    counters = key[:, None] ^ np.arange(1, count + 1, dtype=np.uint64)[None] * np.uint64(0xD1B54A32D192ED03)
    return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # (B, count)


def sample_crop_params(seed: int, indices, epoch: int, height: int, width: int,
                       scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                       hflip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random-resized-crop boxes and flips, deterministic per ``(seed, sample index, epoch)``.

    The same rule as torchvision's ``RandomResizedCrop.get_params`` (area fraction in ``scale``, log-uniform
    aspect ratio in ``ratio``, 10 tries, else the largest centre crop within ``ratio``) and a fair coin
    for the flip, computed for the whole batch at once.

    Args:
        seed: augmentation seed (the DataModule's ``seed``).
        indices: (B,) sample indices in the split.
        epoch: augmented epoch number.
        height: decoded image height (all images of a split share it).
        width: decoded image width.
        scale: crop area range as fractions of the image.
        ratio: aspect-ratio (w / h) range.
        hflip: draw flips; ``False`` gives none.

    Returns:
        boxes: int64 (B, 4) top, left, height, width; flips: bool (B,).
    """
    draws = uniforms(seed, epoch, indices, 4 * RRC_ATTEMPTS + 1)  # (B, 41)
    tries = draws[:, :-1].reshape(-1, RRC_ATTEMPTS, 4)  # (B, 10, 4)
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    aspect = np.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    crop_w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
    crop_h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)  # (B, 10)
    first = fits.argmax(axis=1)  # first try that fits
    rows = np.arange(len(first))
    crop_h, crop_w, pick = crop_h[rows, first], crop_w[rows, first], tries[rows, first]
    top = np.floor(pick[:, 2] * (height - crop_h + 1)).astype(np.int64)
    left = np.floor(pick[:, 3] * (width - crop_w + 1)).astype(np.int64)

    # fallback (no try fits): the largest centre crop with an aspect ratio inside ``ratio``
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    none_fit = ~fits.any(axis=1)
    crop_h = np.where(none_fit, fallback_h, crop_h)
    crop_w = np.where(none_fit, fallback_w, crop_w)
    top = np.where(none_fit, (height - fallback_h) // 2, top)
    left = np.where(none_fit, (width - fallback_w) // 2, left)
    flips = (draws[:, -1] < 0.5) if hflip else np.zeros(len(rows), bool)
    return np.stack([top, left, crop_h, crop_w], axis=1), flips


# --- cropping --------------------------------------------------------------------------------------
def apply_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, resize to ``size`` (bilinear), flip where asked: uint8 in, uint8 out.

    The one crop implementation for teacher (when storing) and student (when replaying), so both see
    the same pixels for the same parameters. Runs on the images' device (batched kornia warp).

    Args:
        images: uint8 (B, 3, H, W) full decoded images.
        boxes: (B, 4) integer top, left, height, width.
        flips: (B,) bool, horizontal flip after cropping.
        size: output side S.

    Returns:
        uint8 (B, 3, S, S).
    """
    from kornia.geometry.transform import crop_and_resize

    boxes = boxes.to(images.device, torch.float32)
    top, left, height, width = boxes.unbind(1)  # (B,) each
    right, bottom = left + width - 1, top + height - 1
    corners = torch.stack([torch.stack([left, top], 1), torch.stack([right, top], 1),
                           torch.stack([right, bottom], 1), torch.stack([left, bottom], 1)], 1)  # (B, 4, 2) as (x, y)
    crops = crop_and_resize(images.float(), corners, (size, size), mode="bilinear", align_corners=True)  # (B, 3, S, S)
    crops = torch.where(flips.to(images.device).view(-1, 1, 1, 1), crops.flip(-1), crops)
    return crops.round_().clamp_(0, 255).to(torch.uint8)


# --- the batch transform ---------------------------------------------------------------------------
BATCHES_KEY = "data.init_args.batches.init_args"


class StoredCrops(BatchTransform):
    """Training batches replay the crops stored by ``visionlab store-logits`` with their top-k teacher logits.

    The back-end serves the training split as whole decoded images with each sample's index
    (``full_train_images``: no random crop; every image as stored, or its centre square resized to
    ``decode_size``); this transform crops them on the device with the stored boxes and flips and adds the
    stored logits of each crop (keys in the module docstring). Validation batches pass through unchanged.

    Args:
        logits_path: file written by ``visionlab store-logits`` (needed to fit, not to store).
        decode_size: decode every training image as its centre square resized to this side before cropping;
            ``None`` keeps images as they are (they must then share one size, as the embedded Fashion-MNIST).
        crops_per_image: n stored crops of each image per training step (FKD's ``num_crops``).
    """

    full_train_images = True

    def __init__(self, logits_path: str | None = None, decode_size: int | None = None, crops_per_image: int = 1):
        if crops_per_image < 1:
            raise ConfigError(f"crops_per_image {crops_per_image} must be at least 1")
        self.logits_path = logits_path
        self.decode_size = decode_size
        self.crops_per_image = crops_per_image
        self.replay_epoch = 0  # used when no Trainer is attached (scripts, tests)
        self.stored: SparseLogits | None = None

    def epoch(self, datamodule) -> int:
        """The training epoch: the Trainer's when attached, else ``replay_epoch``."""
        return datamodule.trainer.current_epoch if datamodule.trainer is not None else self.replay_epoch

    @staticmethod
    def crop_params(datamodule, indices, epoch: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Freshly drawn ``(boxes (B, 4), flips (B,))`` of ``datamodule``'s settings for ``indices`` at ``epoch``."""
        hp = datamodule.hparams
        return sample_crop_params(datamodule.seed, np.asarray(indices), epoch, height, width, hp.rrc_scale,
                                  hp.rrc_ratio, hp.hflip)

    def replay_meta(self, datamodule) -> dict:
        """What a stored-logits file must match to be replayed with this data config."""
        source = datamodule.get_source("train")
        return {"num_samples": len(source), "source_fingerprint": source.fingerprint,
                "image_size": datamodule.image_size, "decoded_pixels": datamodule.decoded_pixels(self.decode_size)}

    def load_stored(self, datamodule) -> SparseLogits:
        """Open ``logits_path`` and check it was made from this training split (ConfigError otherwise)."""
        if not self.logits_path:
            raise ConfigError(f"{BATCHES_KEY}.logits_path is not set: run `visionlab store-logits --output FILE` "
                              "and pass FILE")
        stored = load_sparse_logits(self.logits_path)
        for key, expected in self.replay_meta(datamodule).items():
            if stored.meta.get(key) != expected:
                raise ConfigError(
                    f"{self.logits_path} was stored with {key}={stored.meta.get(key)!r} but this data config has "
                    f"{expected!r}: use the data settings of the store-logits run or store logits again")
        self.stored = stored
        return stored

    def setup(self, datamodule, stage: str) -> None:
        if stage == "fit":
            self.load_stored(datamodule)

    def __call__(self, datamodule, batch: dict, training: bool) -> dict:
        if "index" not in batch:  # validation: the back-end's centre-cropped images
            return datamodule.prepare_batch(batch)
        images, labels, indices = batch["image"], batch["label"], batch["index"]  # (B, 3, H, W) uint8, (B,), (B,)
        stored = self.stored if self.stored is not None else self.load_stored(datamodule)
        decoded = list(images.shape[-2:])
        if stored.meta.get("decoded_hw") != decoded:
            raise ConfigError(f"{self.logits_path} was stored from {stored.meta.get('decoded_hw')} px decoded images, "
                              f"the loader gives {decoded}: use the store-logits run's data settings")
        n = self.crops_per_image
        if n > stored.epochs:
            raise ConfigError(f"{BATCHES_KEY}.crops_per_image {n} exceeds the {stored.epochs} stored epochs of "
                              f"{self.logits_path}: store at least {n} epochs or use fewer crops")
        epoch = self.epoch(datamodule)
        rows = np.tile(indices.cpu().numpy(), n)  # (n B,) crop-major, as FKD concatenates its crops
        columns = np.repeat([(epoch * n + j) % stored.epochs for j in range(n)], len(indices))  # (n B,)
        crops = apply_crops(images.repeat(n, 1, 1, 1), torch.from_numpy(stored.crop_boxes[rows, columns].astype(np.int64)),
                            torch.from_numpy(stored.flips[rows, columns].astype(bool)), datamodule.image_size)
        device = images.device

        def read(array, dtype):
            return torch.from_numpy(array[rows, columns].astype(dtype)).to(device)

        values, classes = read(stored.topk_values, np.float32), read(stored.topk_indices, np.int64)  # (n B, k)
        lse = read(stored.topk_logsumexp, np.float32)  # (n B,)
        return {"image": datamodule.normalize(crops), "label": labels.long().view(-1).repeat(n),
                "index": indices.long().view(-1).repeat(n),
                "topk_values": values, "topk_indices": classes, "topk_logsumexp": lse,
                "logits_temperature": float(stored.meta["temperature"])}


def with_stored_crops(datamodule: ImageDataModule, logits_path: str | None = None) -> ImageDataModule:
    """``datamodule`` itself when its ``batches`` are ``StoredCrops``, else its data config (same class and
    settings, a new DataModule that takes over its loader back-end) with ``StoredCrops(logits_path)`` as its batch
    transform."""
    if not isinstance(datamodule, ImageDataModule):
        raise ConfigError(f"{type(datamodule).__name__} cannot replay augmentations: use an FFCV or torchvision data config")
    if isinstance(datamodule.batches, StoredCrops):
        return datamodule
    if datamodule.batches is not None:
        raise ConfigError(f"data.init_args.batches is {type(datamodule.batches).__name__}: stored crops need "
                          "datamodules.replay.StoredCrops there instead")
    parts = ("batches", "loader", "batch_augment", "normalized_augment")  # recorded parts, not arguments to pass on
    settings = {k: v for k, v in datamodule.hparams.items() if k not in parts}
    return type(datamodule)(**settings, batches=StoredCrops(logits_path), loader=datamodule.loader)
