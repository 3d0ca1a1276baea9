"""datamodules/ffcv_ops.py: FFCV's random-resized crops and flips drawn from a seeded stream, so seeded runs repeat."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.base import ImageDataModule, loader_batch
from datamodules.ffcv_ops import _splitmix
from tests.conftest import cli_args, ffcv_data

LIMITS = dict(train_limit=128, val_limit=32)


def _epochs(beton_cache, epochs: int = 1, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, .beton indices) of each epoch's whole training split, in loader order."""
    settings = dict(cache_dir=beton_cache, image_size=16, batch_size=32, num_workers=2, rrc_scale=(0.2, 1.0), **LIMITS)
    dm = ffcv_data(**{**settings, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = []
    for _ in range(epochs):
        batches = [loader_batch(b) for b in loader]
        out.append((torch.cat([b["image"] for b in batches]), torch.cat([b["index"] for b in batches])))
    return out


@pytest.fixture(autouse=True)
def with_index(monkeypatch):
    """The loaders add each sample's .beton index (as a ``batches`` transform that asks for it makes them)."""
    monkeypatch.setattr(ImageDataModule, "yields_index", property(lambda self: True))


def test_splitmix_is_the_reference_finaliser():
    # splitmix64 (Steele, Lea & Flood 2014; Vigna's reference C): the first outputs of the generator seeded with 0
    state, outputs = np.uint64(0), []
    with np.errstate(over="ignore"):
        for _ in range(2):
            outputs.append(int(_splitmix(state)))
            state = state + np.uint64(0x9E3779B97F4A7C15)
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_a_seeded_loader_repeats_its_crops_and_flips(beton_cache):
    (first, order), = _epochs(beton_cache)
    (again, order_again), = _epochs(beton_cache)
    assert torch.equal(order, order_again) and torch.equal(first, again)  # 2 decoding threads, crop for crop
    (other, other_order), = _epochs(beton_cache, augment_seed=1)
    assert torch.equal(order, other_order)  # the order follows data.seed, the crops augment_seed
    assert not torch.equal(first, other)
    (unseeded, _), = _epochs(beton_cache, seeded_augmentation=False)
    assert first.shape == unseeded.shape and first.dtype == unseeded.dtype


def test_each_epoch_draws_new_crops(beton_cache):
    (epoch0, idx0), (epoch1, idx1) = _epochs(beton_cache, epochs=2, order="sequential")
    assert torch.equal(idx0, idx1)  # same samples in the same places ...
    changed = (epoch0 != epoch1).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # ... on other crops (the same box twice is rare with scale 0.2-1)


def test_repeated_copies_of_an_image_draw_different_crops(beton_cache):
    (images, indices), = _epochs(beton_cache, repeated_augmentation=2, order="random")
    pairs = [torch.nonzero(indices == i).flatten() for i in indices.unique()]
    pairs = [p for p in pairs if len(p) == 2]
    assert len(pairs) > 20
    different = [not torch.equal(images[a], images[b]) for a, b in pairs]
    assert sum(different) >= 0.9 * len(pairs)


def test_crops_and_flips_are_ffcvs(beton_cache):
    """With a full-image box (scale and ratio 1 on square images) the only draw left is the flip: every seeded image is
    FFCV's own decode or its mirror, and about half are mirrored."""
    fixed = dict(rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), order="sequential", train_limit=512)
    (plain, idx), = _epochs(beton_cache, hflip=False, seeded_augmentation=False, **fixed)
    (seeded, seeded_idx), = _epochs(beton_cache, hflip=False, **fixed)
    assert torch.equal(idx, seeded_idx) and torch.equal(plain, seeded)
    (flipped, _), = _epochs(beton_cache, hflip=True, **fixed)
    mirrored = torch.tensor([torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain)])
    unchanged = torch.tensor([torch.equal(f, p) for f, p in zip(flipped, plain)])
    symmetric = torch.tensor([torch.equal(p, p.flip(-1)) for p in plain])
    assert bool((mirrored | unchanged).all()) and not symmetric.any()
    # flips ~ Binomial(512, 0.5): mean 256, sd 11.3; 5 sd either side
    assert 200 < int(mirrored.sum()) < 312


@pytest.mark.slow
def test_two_seeded_cli_fits_train_the_same_weights(run_cli, tmp_path, beton_cache):
    """The user-level promise: one config and seed, two runs, the same model (FFCV training crops included)."""
    states = []
    for run in ("a", "b"):
        assert run_cli(cli_args(tmp_path / run, beton_cache, "--trainer.limit_train_batches", "3",
                                "--trainer.limit_val_batches", "1")) == 0
        states.append(torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
