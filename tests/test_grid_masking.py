"""CLIP's GridMasking (MAE's grid-wise sampling): one kept patch per stride x stride cell at a per-image offset,
the encoder's token count, the bind-time grid check, and configs/clip/grid_masking.yaml through the CLI."""

from __future__ import annotations

import pytest
import torch

from modules.components.backbones import create_backbone
from modules.components.clip.token_masking import GridMasking, grid_keep_index
from modules.components.errors import ConfigError
from modules.components.masked_vit import encode
from tests.conftest import cli_args


def _hand_index(dy: int, dx: int) -> set[int]:
    """Kept patches of a 4x4 grid, stride 2, offset (dy, dx): patch (2cy + dy, 2cx + dx) of each of the 4 cells."""
    return {(2 * cy + dy) * 4 + 2 * cx + dx for cy in range(2) for cx in range(2)}


def _tiny_clip(masking):
    from modules.clip import CLIPModule

    torch.manual_seed(0)
    return CLIPModule("test_vit", 3, 32, {"patch_size": 4, "depth": 2}, embed_dim=16, text_width=16, text_depth=1,
                      text_heads=2, vocab_size=100, masking=masking)


@pytest.fixture(scope="module")
def vit_4x4():
    torch.manual_seed(0)
    return create_backbone("test_vit", num_classes=0, image_size=16, patch_size=4, depth=1).eval()  # 4x4 patches


def test_grid_index_for_given_offsets_is_the_hand_computed_one():
    offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
    index = grid_keep_index(offsets, (4, 4), 2)
    assert index.tolist() == [[0, 2, 8, 10], [4, 6, 12, 14], [1, 3, 9, 11], [5, 7, 13, 15]]
    # A non-square grid: 2x4 cells of stride 2 on a 4x8 grid, offset (1, 1) -> rows 1, 3 and columns 1, 3, 5, 7.
    assert grid_keep_index(torch.tensor([[1, 1]]), (4, 8), 2).tolist() == [[9, 11, 13, 15, 25, 27, 29, 31]]


def test_view_keeps_one_patch_per_cell_at_a_per_image_offset(vit_4x4):
    masking = GridMasking()
    assert masking.ratio == 0.75 and GridMasking(4).ratio == 1 - 1 / 16
    images = torch.randn(16, 3, 16, 16)
    torch.manual_seed(3)
    view, index = masking.view(images, vit_4x4)
    assert view is images and index.shape == (16, 4)  # K = 16 patches / 2^2
    torch.manual_seed(3)
    drawn = torch.randint(2, (16, 2))  # the offsets view drew from the global RNG
    for row, (dy, dx) in zip(index.tolist(), drawn.tolist()):
        assert set(row) == _hand_index(dy, dx) and row == sorted(row)
        assert {(i // 4 // 2, i % 4 // 2) for i in row} == {(0, 0), (0, 1), (1, 0), (1, 1)}  # one per 2x2 cell
    assert len({tuple(o) for o in drawn.tolist()}) >= 2  # images keep different cells


def test_encoder_sees_only_the_kept_tokens(vit_4x4):
    images = torch.randn(2, 3, 16, 16)
    _, index = GridMasking().view(images, vit_4x4)
    with torch.no_grad():
        tokens = encode(vit_4x4, images, keep_index=index)
    assert tokens.shape == (2, vit_4x4.num_prefix_tokens + 4, vit_4x4.embed_dim)
    module = _tiny_clip(GridMasking(2))  # 8x8 grid through the CLIP module: 16 of 64 patches
    view, index = module.masked_view(torch.randn(3, 3, 32, 32))
    assert index.shape == (3, 16)
    with torch.no_grad():
        tokens = encode(module.model.image_trunk, view, keep_index=index)
    assert tokens.shape[1] == module.model.image_trunk.num_prefix_tokens + 16


def test_stride_that_does_not_divide_the_grid_is_a_config_error():
    with pytest.raises(ConfigError, match="stride 3 does not divide the 8x8 patch grid"):
        _tiny_clip(GridMasking(3))
    with pytest.raises(ConfigError, match="stride"):
        GridMasking(0)


@pytest.mark.slow
def test_grid_masking_config_fits_through_cli(run_cli, tmp_path, beton_cache):
    args = cli_args(tmp_path / "run", beton_cache, "--trainer.fast_dev_run", "true", model="clip/grid_masking.yaml")
    assert run_cli(args) == 0
