"""The one masked-ViT encoder behind SimMIM, MAE/MR-MAE and CLIP token dropping."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from modules.components.errors import ConfigError
from modules.components.masked_vit import cls_attention, encode, encode_pooled, keep_tokens

VARIANTS = {  # timm's three position-embedding rules: class token inside pos_embed, registers, DeiT-III style
    "cls": {},
    "registers": {"reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True, "reg_tokens": 1, "global_pool": "avg"},
}


def _vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, **kwargs).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_nothing_masked_equals_timm_forward_features_exactly(variant):
    vit = _vit(**VARIANTS[variant])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    nothing = torch.zeros(2, 16, dtype=torch.bool)
    every = torch.arange(16).expand(2, -1)
    token = torch.randn(1, 1, 32)
    with torch.no_grad():
        reference = vit.forward_features(images)
        assert torch.equal(encode(vit, images), reference)
        assert torch.equal(encode(vit, images, mask=nothing, mask_token=token), reference)
        assert torch.equal(encode(vit, images, keep_index=every), reference)
        assert torch.equal(encode_pooled(vit, images), vit.forward_head(reference, pre_logits=True))
        vit.set_grad_checkpointing(True)
        assert torch.equal(encode(vit, images), reference)


def test_mask_token_replaces_the_patch_embedding_before_the_position_embedding():
    vit = _vit()
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    token = torch.randn(1, 1, 32)
    seen = []
    vit.norm_pre.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        encode(vit, images, mask=mask, mask_token=token)
        patches = vit.patch_embed(images)
    tokens = seen[0]  # (1, 1 + 16, D): class token then patches, position-embedded
    expected = token[0, 0] + vit.pos_embed[0, 1 + 5]
    torch.testing.assert_close(tokens[0, 1 + 5], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[0, 1 + 4], patches[0, 4] + vit.pos_embed[0, 1 + 4], rtol=0, atol=1e-6)


def test_kept_tokens_keep_their_positions_and_order():
    tokens = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)  # 1 prefix + 4 patches
    kept = keep_tokens(tokens, torch.tensor([[3, 0], [1, 2]]), num_prefix_tokens=1)
    assert kept[..., 0].tolist() == [[0, 4, 1], [5, 7, 8]]


def test_wrong_image_size_is_a_config_error():
    with pytest.raises(ConfigError, match="built for"):
        encode(_vit(), torch.zeros(1, 3, 16, 16))


def test_cls_attention_is_a_distribution_over_patches():
    scores = cls_attention(_vit(), torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, 16) and (scores > 0).all() and (scores.sum(dim=1) < 1).all()
