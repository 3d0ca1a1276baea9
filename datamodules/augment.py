"""Augmentation on the device: recipes applied to the training batch after transfer, before normalisation.

``ImageDataModule(batch_augment=[...])`` runs these kornia modules on the uint8 batch as 0..1 floats, for both
loader back-ends and every technique; ``normalized_augment=[...]`` runs after normalisation (random erasing
fills with normal noise in normalised units there, as timm/DeiT do). Parameters are drawn per sample.

kornia's ``auto.RandAugment`` / ``auto.TrivialAugment`` draw the operation once per batch; the papers (and
timm) draw it per image, so ``RandAugment`` and ``TrivialAugment`` here draw one operation per image and
layer and run each kornia operation on the images that drew it (at most ``layers x ops`` calls per batch).
Operation ranges and the magnitude -> strength mapping are kornia's (the TensorFlow reference's: level
``m`` of 30, enhancement factors ``0.1 + 1.8 m / 30``), so magnitude 0 is not the identity for every op.
"""

from __future__ import annotations

import random
from typing import Sequence

import kornia.augmentation as K
import numpy as np
import torch
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy as RAND_AUGMENT_OPS
from kornia.augmentation.auto.trivial_augment.trivial_augment import default_policy as TRIVIAL_AUGMENT_OPS
from torch import nn


class PerSampleChoice(nn.Module):
    """Each image goes through ``layers`` candidates drawn uniformly with replacement (independently per image).

    Args:
        candidates: augmentation modules on (B, 3, H, W) 0..1 floats.
        layers: candidates applied in sequence to each image.
    """

    def __init__(self, candidates: Sequence[nn.Module], layers: int = 1):
        super().__init__()
        if not candidates or layers < 1:
            raise ValueError("PerSampleChoice needs at least one candidate and one layer")
        self.candidates, self.layers = nn.ModuleList(candidates), layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for _ in range(self.layers):
            choice = torch.randint(len(self.candidates), (images.shape[0],))  # (B,)
            out = images.clone()
            for k in choice.unique().tolist():
                rows = torch.nonzero(choice == k).flatten().to(images.device)
                out[rows] = self.candidates[k](images[rows]).to(images.dtype)
            images = out
        return images


class RandAugment(PerSampleChoice):
    """RandAugment (Cubuk et al., 2020): ``num_ops`` operations per image at one magnitude, drawn per image.

    Args:
        num_ops: operations per image (the paper's N; 2 for ImageNet).
        magnitude: level in (0, 30) on kornia's scale; the default 27 is the paper's ImageNet ResNet-50
            setting M = 9 of 10 (DeiT's ``rand-m9``), as the reference's 10-level scale maps to 30 here.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 27):
        from kornia.augmentation.auto import RandAugment as KorniaRandAugment

        super().__init__([KorniaRandAugment(n=1, m=magnitude, policy=[op]) for op in RAND_AUGMENT_OPS], layers=num_ops)


class TrivialAugment(PerSampleChoice):
    """TrivialAugment (Mueller & Hutter, 2021): one operation per image at a magnitude drawn per image."""

    def __init__(self):
        from kornia.augmentation.auto import TrivialAugment as KorniaTrivialAugment

        super().__init__([KorniaTrivialAugment(policy=[op]) for op in TRIVIAL_AUGMENT_OPS], layers=1)


class ThreeAugment(nn.Module):
    """DeiT III's 3-Augment (Touvron et al., 2022): per image one of grayscale, solarisation or Gaussian blur,
    then colour jitter. The crop and flip come from the loader, as in the reference.

    Args:
        color_jitter: brightness = contrast = saturation strength (DeiT III: 0.3); 0 disables.
        blur_sigma: Gaussian blur sigma range (the reference's PIL radius 0.1..2).
        blur_kernel: blur kernel side (odd; 13 covers 3 sigma at sigma 2).
    """

    def __init__(self, color_jitter: float = 0.3, blur_sigma: tuple[float, float] = (0.1, 2.0), blur_kernel: int = 13):
        super().__init__()
        self.choice = PerSampleChoice([
            K.RandomGrayscale(p=1.0),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=1.0),  # threshold 0.5 = PIL's 128
            K.RandomGaussianBlur((blur_kernel, blur_kernel), tuple(blur_sigma), p=1.0),
        ])
        self.jitter = K.ColorJitter(color_jitter, color_jitter, color_jitter, 0.0, p=1.0) if color_jitter else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.jitter(self.choice(images))


class NormalizedRandomErasing(nn.Module):
    """timm's per-image random erasing (Zhong et al., 2020) on the normalised batch, as DeiT applies it.

    Args:
        probability: chance an image gets erased.
        mode: ``pixel`` (normal noise per pixel, DeiT's), ``rand`` (one colour per box) or ``const`` (zeros).
        max_count: boxes per image at most.
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel", max_count: int = 1):
        super().__init__()
        self.probability, self.mode, self.max_count = probability, mode, max_count

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from timm.data.random_erasing import RandomErasing

        erase = RandomErasing(probability=self.probability, mode=self.mode, max_count=self.max_count, device=images.device)
        return erase(images.clone())


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A 63-bit seed per (seed, rank, epoch, step): ranks differ, a rerun repeats."""
    return int(np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class DeviceAugment:
    """The augmentation stages of one DataModule, seeded per step.

    Args:
        pixel: modules on 0..1 float images (before normalisation).
        normalized: modules on the normalised images.
        seed: base seed; each step's draws depend on (seed, rank, epoch, step) only, not on the model's RNG use.
    """

    def __init__(self, pixel: Sequence[nn.Module], normalized: Sequence[nn.Module], seed: int):
        self.pixel, self.normalized, self.seed = nn.Sequential(*pixel), nn.Sequential(*normalized), seed
        self._epoch, self._step = -1, 0

    def __bool__(self) -> bool:
        return len(self.pixel) + len(self.normalized) > 0

    @staticmethod
    def _forked(device: torch.device):
        return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])

    def __call__(self, images: torch.Tensor, normalize, rank: int = 0, epoch: int = 0) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> augmented, normalised float32."""
        if epoch != self._epoch:
            self._epoch, self._step = epoch, 0
        seed = step_seed(self.seed, rank, epoch, self._step)
        self._step += 1
        python_state = random.getstate()
        try:
            with self._forked(images.device):
                torch.manual_seed(seed)
                random.seed(seed)  # timm's random erasing draws from Python's RNG
                images = images.float()
                if len(self.pixel):
                    self.pixel.to(images.device)
                    images = self.pixel(images / 255).clamp(0, 1) * 255
                images = normalize(images)
                if len(self.normalized):
                    images = self.normalized(images)
        finally:
            random.setstate(python_state)
        return images
