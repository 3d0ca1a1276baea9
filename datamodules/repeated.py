"""Repeated augmentation (Hoffer et al., 2020; DeiT's ``RASampler``) as an FFCV traversal order."""

from __future__ import annotations

import math

import numpy as np


def repeated_order(indices: np.ndarray, repeats: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's sample order for one epoch: each index ``repeats`` times, the copies on consecutive ranks.

    As DeiT's sampler: shuffle (seeded by seed + epoch, the same on every rank), repeat each index ``repeats``
    times in a row, pad cyclically to a multiple of ``world_size``, deal round-robin (rank r takes positions
    r, r + world, ...), then keep ``ceil(N / world)`` per rank so the epoch is as long as without repeats.
    DeiT keeps ``floor(N / 256) * 256 / world`` (a whole number of 256-image batches); the plain distributed
    sampler's count is kept here instead so that switching repeats on leaves the step count alone.
    """
    indices = np.asarray(indices)
    order = np.random.default_rng(seed + epoch).permutation(indices)
    repeated = np.repeat(order, repeats)
    per_rank = math.ceil(len(repeated) / world_size)
    padded = np.resize(repeated, per_rank * world_size)  # cyclic padding
    return padded[rank::world_size][: math.ceil(len(indices) / world_size)]


def repeated_traversal(repeats: int, rank: int, world_size: int):
    """An object FFCV's ``Loader(order=...)`` accepts that yields ``repeated_order`` each epoch."""
    from ffcv.traversal_order.base import TraversalOrder

    class RepeatedAugmentation(TraversalOrder):
        def __init__(self, loader=None):
            if loader is not None:
                super().__init__(loader)

        # ffcv 1.0.2's Loader checks ``isinstance(order, TraversalOrder)`` and then calls ``order(loader)``:
        # a custom order must be an instance that builds the loader-bound order when called.
        def __call__(self, loader):
            return RepeatedAugmentation(loader)

        def sample_order(self, epoch: int):
            return repeated_order(self.indices, repeats, rank, world_size, self.seed or 0, epoch)

    return RepeatedAugmentation()
