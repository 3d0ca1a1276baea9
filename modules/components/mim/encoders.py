"""SimMIM's encoders, the MAE decoder and frozen-teacher features shared by SimMIM, MAE and MR-MAE.

Everything here *wraps* an unmodified timm model: ViTs go through the one masked-ViT encoder
(`modules.components.masked_vit`), BEiT and Swin through their own timm steps, so the weights keep timm's
names and load into a plain timm classifier for fine-tuning.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from modules.components.backbones import create_backbone
from modules.components.errors import ConfigError
from modules.components.masked_vit import encode, require_vit, vit_geometry, with_mask_token
from modules.components.mim.masking import (
    gather_tokens,
    mae_shuffle,
    masked_mse_loss,
    normalized_patch_targets,
    patchify,
    token_mask_to_pixels,
    unpatchify,
)
from modules.components.pos_embed import sincos_2d
from modules.components.tokens import resize_tokens
from modules.components.transfer import build_from_checkpoint


# --- SimMIM: mask token inside a ViT or Swin encoder ----------------------------------------------
def embed_dim_of(backbone: nn.Module) -> int:
    return int(getattr(backbone, "embed_dim", None) or backbone.num_features)


def patch_size_of(backbone: nn.Module) -> int:
    patch = backbone.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def masked_feature_map(backbone: nn.Module, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """SimMIM encoder: masked patch embeddings replaced by ``mask_token``, then the unmodified encoder.

    Supports timm ``VisionTransformer``, ``Beit`` (the ViT of SimMIM's reference: layer scale and a
    relative position bias shared by all blocks, ``use_shared_rel_pos_bias=True, use_abs_pos_emb=False``)
    and ``SwinTransformer`` (hierarchical: the mask lives at the patch-embedding resolution and the
    output is at the last stage's stride).

    Args:
        backbone: the timm encoder.
        images: (B, C, H, W).
        mask: (B, N) bool token mask at the patch-embedding grid.
        mask_token: (1, 1, D) learnable token, D = patch-embedding width.

    Returns:
        (B, D_out, H / stride, W / stride) feature map.
    """
    if isinstance(backbone, VisionTransformer):
        grid, _ = vit_geometry(backbone)
        x = encode(backbone, images, mask=mask, mask_token=mask_token)[:, backbone.num_prefix_tokens:]  # (B, N, D)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    if isinstance(backbone, Beit):  # the steps of Beit.forward_features, with the mask token
        x = with_mask_token(backbone.patch_embed(images), mask, mask_token)  # (B, N, D)
        x = torch.cat([backbone.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x if backbone.pos_embed is None else x + backbone.pos_embed
        x = backbone.pos_drop(x)
        shared_bias = backbone.rel_pos_bias() if backbone.rel_pos_bias is not None else None
        for block in backbone.blocks:
            x = block(x, shared_rel_pos_bias=shared_bias)
        x = backbone.norm(x)[:, 1:]  # (B, N, D)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *backbone.patch_embed.grid_size)
    if isinstance(backbone, SwinTransformer):
        x = with_mask_token(backbone.patch_embed(images), mask, mask_token)  # (B, h, w, C)
        x = backbone.norm(backbone.layers(x))  # (B, h', w', C')
        return x.permute(0, 3, 1, 2)
    raise ConfigError(f"SimMIM supports timm ViT, BEiT and Swin backbones, got {type(backbone).__name__}")


def patch_embed_grid(backbone: nn.Module) -> tuple[int, int]:
    """Token grid at the patch-embedding resolution (ViT and Swin)."""
    return tuple(backbone.patch_embed.grid_size)


# --- MAE decoder ----------------------------------------------------------------------------------
class MAEDecoder(nn.Module):
    """MAE's light decoder: visible latents + mask tokens, unshuffled, through a few ViT blocks to pixels.

    As the reference: fixed 2-D sin-cos position embeddings (not trained) on the patch tokens, LayerNorms
    with eps 1e-6. The prefix (class) tokens pass through without a position embedding, which equals the
    reference's zero row for the class token.

    Args:
        encoder_dim: width of the encoder tokens.
        grid_size: patch grid ``(h, w)`` (N = h * w patches per image).
        patch_pixels: values predicted per patch (patch_size**2 * channels).
        num_prefix_tokens: class/register tokens leading the encoder output (passed through, then dropped).
        dim: decoder width.
        depth: decoder blocks.
        num_heads: decoder attention heads.
        mlp_ratio: MLP expansion of the decoder blocks.
        learned_pos_embed: a trained position embedding (truncated-normal 0.02 init) instead of the
            reference's fixed sin-cos table; an option, not MAE's recipe.
    """

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int], patch_pixels: int, num_prefix_tokens: int = 1,
                 dim: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0,
                 learned_pos_embed: bool = False):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid_size), requires_grad=learned_pos_embed)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                      for _ in range(depth)])
        self.norm = norm_layer(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        if learned_pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, P + K, D_enc) encoder output, (B, N) inverse shuffle -> (B, N, patch_pixels) predictions."""
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n - visible.shape[1], -1)
        x = gather_tokens(torch.cat([visible, masked], dim=1), ids_restore) + self.pos_embed  # (B, N, dim)
        x = self.blocks(torch.cat([prefix, x], dim=1))
        x = self.norm(x)[:, self.num_prefix_tokens:]
        return self.pred(x)  # (B, N, patch_pixels)


def mae_init_(backbone: VisionTransformer, decoder: MAEDecoder, learned_pos_embed: bool = False) -> None:
    """MAE's reference initialisation of its encoder and decoder, in place.

    Xavier-uniform for every Linear (bias 0) and for the patch embedding seen as a Linear, LayerNorm
    (1, 0), normal(0.02) class/register and mask tokens; unless ``learned_pos_embed``, the encoder's
    position embedding becomes the fixed 2-D sin-cos table (zero rows for the prefix tokens) and is not
    trained. Fine-tuning loads it as an ordinary (trained) parameter, as the reference's fine-tuning does.
    """
    for module in (*backbone.modules(), *decoder.modules()):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    weight = backbone.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for token in (backbone.cls_token, backbone.reg_token, decoder.mask_token):
        if token is not None:
            nn.init.normal_(token, std=0.02)
    if not learned_pos_embed and backbone.pos_embed is not None:
        grid, _ = vit_geometry(backbone)
        prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
        backbone.pos_embed.data.copy_(sincos_2d(backbone.pos_embed.shape[-1], grid, prefix))
        backbone.pos_embed.requires_grad_(False)


def mae_reconstruct(backbone: VisionTransformer, decoder: MAEDecoder, images: torch.Tensor, mask_ratio: float,
                    norm_pix_loss: bool = True, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One MAE pass: shuffle, encode the visible tokens, decode all, masked MSE on (normalised) patches.

    Returns a dict with ``loss``, ``latent`` (B, P + K, D), ``ids_keep`` (B, K), ``mask`` (B, N) and
    ``reconstruction`` (B, C, H, W): predicted pixels on masked patches, the input elsewhere (for display).
    """
    grid, patch = vit_geometry(backbone)
    num_patches = grid[0] * grid[1]
    ids_keep, ids_restore, mask = mae_shuffle(images.shape[0], num_patches, mask_ratio, images.device, generator)
    latent = encode(backbone, images, keep_index=ids_keep)  # (B, P + K, D), visible tokens only: MAE's speed-up
    prediction = decoder(latent, ids_restore)  # (B, N, p*p*C)
    patches = patchify(images, patch)
    if norm_pix_loss:
        target, mean, std = normalized_patch_targets(patches)
        shown = prediction.detach() * std + mean
    else:
        target, shown = patches, prediction.detach()
    loss = masked_mse_loss(prediction, target, mask)
    pixel_mask = token_mask_to_pixels(mask, grid, patch)
    shown = unpatchify(shown, patch, grid, images.shape[1])
    reconstruction = images * (1 - pixel_mask) + shown * pixel_mask
    return {"loss": loss, "latent": latent, "ids_keep": ids_keep, "mask": mask, "pixel_mask": pixel_mask,
            "reconstruction": reconstruction}


# --- pretraining backbones and frozen encoders -----------------------------------------------------
def pretraining_backbone(name: str, num_classes: int, image_size: int | None, kwargs: dict | None = None) -> nn.Module:
    """The timm encoder a pretraining technique stores as ``self.backbone``.

    It keeps timm's (unused, frozen) classifier so that the checkpoint's ``backbone.*`` keys are exactly
    those of a timm classifier: `ClassificationModule(init_checkpoint=...)` then loads every encoder
    weight strictly (a head of another shape is replaced).
    """
    backbone = create_backbone(name, num_classes=num_classes, image_size=image_size, **(kwargs or {}))
    backbone.get_classifier().requires_grad_(False)
    return backbone


def mae_encoder_decoder(name: str, num_classes: int, image_size: int | None, kwargs: dict | None, technique: str,
                        decoder_dim: int, decoder_depth: int, decoder_heads: int, learned_pos_embed: bool = False,
                        ) -> tuple[VisionTransformer, MAEDecoder, tuple[int, int]]:
    """The ViT encoder, its pixel decoder and the patch grid of an MAE-style technique (MAE, MR-MAE).

    Both are initialised as MAE's reference (`mae_init_`), with fixed sin-cos position embeddings
    unless ``learned_pos_embed``.
    """
    backbone = require_vit(pretraining_backbone(name, num_classes, image_size, kwargs), technique)
    grid, patch = vit_geometry(backbone)
    decoder = MAEDecoder(backbone.embed_dim, grid, patch * patch * 3, backbone.num_prefix_tokens,
                         dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
                         learned_pos_embed=learned_pos_embed)
    mae_init_(backbone, decoder, learned_pos_embed)
    return backbone, decoder, grid


def frozen_encoder(name: str | None, image_size: int | None = None, checkpoint: str | None = None,
                   kwargs: dict | None = None) -> nn.Module:
    """A headless timm encoder, from a visionlab checkpoint (its recorded architecture, ``name``/``kwargs``
    overriding) or by name (random init, no download), frozen: ``requires_grad=False``, eval mode.

    The checkpoint's weights load strictly except its classifier (`transfer.build_from_checkpoint`,
    ``head="drop"``), position embeddings resampled to ``image_size``. Used for MR-MAE teachers and linear probing.
    """
    if checkpoint:
        encoder, _ = build_from_checkpoint(checkpoint, head="drop", image_size=image_size, backbone=name,
                                        backbone_kwargs=kwargs)
    elif name is None:
        raise ConfigError("a frozen encoder needs a checkpoint or a timm model name")
    else:
        encoder = create_backbone(name, num_classes=0, image_size=image_size, **(kwargs or {}))
    return encoder.requires_grad_(False).eval()


def teacher_tokens(teacher: nn.Module, images: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Teacher features as patch tokens on the student's token grid, ``(B, h * w, D_t)``.

    Works for ViTs (prefix tokens dropped), NHWC models (Swin) and NCHW CNNs; other grids are resampled.
    """
    feats = teacher.forward_features(images)
    if feats.ndim == 3:
        prefix = getattr(teacher, "num_prefix_tokens", 0)
        tokens = feats[:, prefix:]  # (B, n, D)
        side = int(round(tokens.shape[1] ** 0.5))
        return resize_tokens(tokens, (side, side), grid_size)
    if getattr(teacher, "output_fmt", "NCHW") == "NHWC":
        feats = feats.permute(0, 3, 1, 2)
    b, d, h, w = feats.shape
    if (h, w) != tuple(grid_size):
        feats = F.interpolate(feats, size=grid_size, mode="bilinear", align_corners=False)
    return feats.flatten(2).transpose(1, 2)
