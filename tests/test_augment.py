"""Device-side augmentation recipes and repeated augmentation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import kornia.augmentation as K
import numpy as np
import pytest
import torch
from torch import nn

from datamodules.augment import (DeviceAugment, NormalizedRandomErasing, PerSampleChoice, RandAugment, ThreeAugment,
                                 TrivialAugment)
from datamodules.repeated import repeated_order
from tests.conftest import ffcv_data, torchvision_data


def _same_image_batch(batch: int = 8) -> torch.Tensor:
    image = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    return image.repeat(batch, 1, 1, 1)  # (B, 3, 32, 32) identical rows


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - 120.0) / 60.0


class _Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, images):
        return torch.full_like(images, self.value)


def test_per_sample_choice_draws_per_image():
    images = torch.rand(64, 3, 4, 4)
    out = PerSampleChoice([_Constant(0.0), _Constant(1.0)])(images)
    per_image = out.flatten(1)
    assert ((per_image == 0).all(1) | (per_image == 1).all(1)).all()  # one candidate per image
    assert 0 < int((per_image == 1).all(1).sum()) < 64  # both drawn within one batch


@pytest.mark.parametrize("recipe", [RandAugment, TrivialAugment, ThreeAugment])
def test_recipes_give_identical_images_different_augmentations(recipe):
    out = DeviceAugment([recipe()], [], seed=0)(_same_image_batch(), _normalize)
    distinct = {tuple(row.flatten()[:64].tolist()) for row in out}
    assert out.shape == (8, 3, 32, 32) and len(distinct) >= 6


def test_augmentation_is_reproducible_under_its_seed_whatever_the_global_rng():
    images = _same_image_batch()

    def run(seed: int, burn: int):
        augment = DeviceAugment([RandAugment(), K.ColorJitter(0.4, 0.4, 0.4, p=1.0)], [NormalizedRandomErasing(0.5)], seed)
        outs = []
        for step in range(2):
            torch.rand(burn)  # the model consuming the global RNG between batches
            outs.append(augment(images, _normalize, rank=0, epoch=0))
        return outs

    first, again, other = run(3, 1), run(3, 7), run(4, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # each step draws anew
    assert not torch.equal(first[0], other[0])
    ranks = DeviceAugment([TrivialAugment()], [], 3)
    assert not torch.equal(ranks(images, _normalize, rank=0), DeviceAugment([TrivialAugment()], [], 3)(images, _normalize, rank=1))


def test_zero_strength_is_the_identity():
    images = _same_image_batch()
    images[1:] = (torch.rand(7, 3, 32, 32) * 255).to(torch.uint8)
    augment = DeviceAugment([K.ColorJitter(0.0, 0.0, 0.0, 0.0, p=1.0), K.RandomErasing(p=0.0)],
                            [NormalizedRandomErasing(probability=0.0)], seed=0)
    # x / 255 * 255 in float32 is within 1 ulp of 255 (2^-16) of x; /60 in the normalisation shrinks it.
    torch.testing.assert_close(augment(images, _normalize), _normalize(images.float()), rtol=0, atol=2 ** -16 / 60 * 2)
    assert not DeviceAugment([], [], 0)  # nothing configured: the DataModule skips the stage entirely


def test_datamodule_augments_training_batches_only():
    dm = torchvision_data(source="fashion_mnist", batch_augment=[K.ColorJitter(0.5, 0.5, 0.5, p=1.0)])
    images, labels = _same_image_batch(), torch.zeros(8, dtype=torch.int64)
    dm.trainer = SimpleNamespace(training=False, global_rank=0, current_epoch=0)
    val = dm.on_after_batch_transfer({"image": images, "label": labels}, 0)["image"]
    assert torch.equal(val, dm.normalize(images))
    dm.trainer = SimpleNamespace(training=True, global_rank=0, current_epoch=0)
    train = dm.on_after_batch_transfer({"image": images, "label": labels}, 0)["image"]
    assert train.dtype == torch.float32 and not torch.allclose(train, val)


def test_repeated_order_by_hand():
    # N=4, 2 repeats, 2 ranks: permutation p -> [p0 p0 p1 p1 p2 p2 p3 p3]; rank r takes r, r+2, ... then 2 of them.
    perm = np.random.default_rng(5 + 0).permutation(np.arange(4))
    for rank in range(2):
        assert repeated_order(np.arange(4), 2, rank, 2, seed=5, epoch=0).tolist() == [perm[0], perm[1]]


@pytest.mark.parametrize("samples,repeats,world", [(50, 3, 4), (48, 3, 8), (10, 1, 3)])
def test_repeated_order_index_sets_per_rank(samples, repeats, world):
    orders = [repeated_order(np.arange(samples), repeats, rank, world, seed=1, epoch=2) for rank in range(world)]
    assert all(len(order) == math.ceil(samples / world) for order in orders)  # epoch length unchanged
    # Deal positions: copy c of the k-th image is at 3k + c, i.e. on rank (3k + c) % world: consecutive ranks.
    perm = np.random.default_rng(1 + 2).permutation(np.arange(samples))
    dealt = np.resize(np.repeat(perm, repeats), math.ceil(samples * repeats / world) * world)
    for rank, order in enumerate(orders):
        assert order.tolist() == dealt[rank::world][: len(order)].tolist()
    if repeats > 1:
        first = perm[0]
        holders = [rank for rank, order in enumerate(orders) if first in order.tolist()]
        assert holders == list(range(min(repeats, world)))  # the first image's copies on ranks 0, 1, 2
    assert not np.array_equal(orders[0], repeated_order(np.arange(samples), repeats, 0, world, seed=1, epoch=3))


def test_ffcv_loader_uses_the_repeated_order_per_rank(beton_cache):

    dm = ffcv_data(source="fashion_mnist", image_size=16, train_limit=60, val_limit=20, batch_size=5, num_workers=1,
                        cache_dir=str(beton_cache), repeated_augmentation=3)
    dm.prepare_data()
    dm.setup("fit")
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader().loader
        assert len(loader) == 30 // 5  # ceil(60 / 2) samples per rank, as without repeats
        expected = repeated_order(np.arange(60), 3, rank, 2, seed=dm.seed, epoch=0)
        assert np.array_equal(loader.traversal_order.sample_order(0), expected)


def test_recipe_overlay_is_configured_from_yaml_for_any_technique(tmp_path, beton_cache):
    import lightning.pytorch as pl

    from app.cli import VisionlabCLI
    from tests.conftest import CONFIGS, cli_args

    args = cli_args(tmp_path, beton_cache, "--config", str(CONFIGS / "data/augment_deit.yaml"))[1:]
    cli = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args)
    augment = cli.datamodule.augment
    assert [type(m).__name__ for m in augment.pixel] == ["RandAugment"] and augment.pixel[0].layers == 2
    assert [type(m).__name__ for m in augment.normalized] == ["NormalizedRandomErasing"]
    assert cli.datamodule.loader.repeated_augmentation == 3
