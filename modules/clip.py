"""CLIP dual encoder with FLIP / Attentive Mask CLIP token dropping, zero-shot and retrieval evaluation.

Implements CLIP (Radford et al., 2021) with FLIP random image-token dropping (Li et al., 2023) and
Attentive Mask CLIP token keeping (Yang et al., 2023).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities import dim_zero_cat

from modules.base import VisionModule
from modules.components.backbones import create_backbone
from modules.components.contrastive import (
    LogitScale, attentive_keep_index, clip_loss, gather_features, num_kept, random_keep_index, recall_at_k,
    vit_cls_attention, vit_encode, zero_shot_head, zero_shot_logits,
)
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig
from modules.components.text import CLIP_VOCAB_SIZE, TextTransformer

MASKINGS = ("random", "attentive")


class RetrievalRecall(Metric):
    """Image->text and text->image recall@k over every (image, text) pair seen, synced across ranks.

    ``update`` takes L2-normalised (B, D) image and text features and (B,) caption ids (equal ids = the same
    caption, any of which is a correct match). ``compute`` returns ``{"i2t_recall@k", "t2i_recall@k"}``.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5)):
        super().__init__()
        self.ks = tuple(ks)
        for name in ("image_features", "text_features", "caption_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_features: torch.Tensor, text_features: torch.Tensor, caption_ids: torch.Tensor) -> None:
        self.image_features.append(image_features.detach().float())
        self.text_features.append(text_features.detach().float())
        self.caption_ids.append(caption_ids.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        images, texts = dim_zero_cat(self.image_features), dim_zero_cat(self.text_features)
        ids = dim_zero_cat(self.caption_ids)
        similarity = images @ texts.t()  # (N, N)
        result = {f"i2t_recall@{k}": v for k, v in recall_at_k(similarity, ids, ids, self.ks).items()}
        result.update({f"t2i_recall@{k}": v for k, v in recall_at_k(similarity.t(), ids, ids, self.ks).items()})
        return result


class DualEncoder(nn.Module):
    """Image tower + text tower, linear projections to a shared space, L2 norm and the logit scale."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int,
                 init_logit_scale: float, max_logit_scale: float):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_projection = nn.Linear(image_encoder.num_features, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_encoder.num_features, embed_dim, bias=False)
        self.logit_scale = LogitScale(init_logit_scale, max_logit_scale)

    def encode_image(self, images: torch.Tensor, keep_index: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.image_encoder(images) if keep_index is None else vit_encode(self.image_encoder, images, keep_index)
        return F.normalize(self.image_projection(pooled), dim=-1)  # (B, E)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_encoder(tokens)), dim=-1)  # (B, E)


class CLIPModule(VisionModule):
    """Contrastive image-text training (CLIP) with optional FLIP / Attentive Mask CLIP token dropping.

    Expects batches ``[images, tokens, labels, caption_ids]`` (``datamodules.captions``). Validation and
    test log the contrastive loss, zero-shot top-1 with a prompt-ensemble head built from the DataModule's
    ``class_prompt_tokens()`` (``val/zeroshot_acc1``) and image<->text recall@1/5 (``val/i2t_recall@1``...).

    Args:
        backbone: timm image tower (headless); token dropping needs a ViT.
        num_classes: classes of the labelled data, for zero-shot (linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments (``depth``, ``patch_size``...).
        embed_dim: shared embedding size.
        text_width: text transformer width.
        text_depth: text transformer layers.
        text_heads: text transformer heads.
        text_max_length: longest caption in tokens.
        vocab_size: token vocabulary (CLIP BPE).
        init_logit_scale: initial inverse temperature (CLIP: 1/0.07).
        max_logit_scale: the inverse temperature never exceeds this (CLIP: 100).
        mask_ratio: share of image patch tokens dropped in training (0 = none; FLIP uses 0.5-0.75).
        masking: ``random`` (FLIP) or ``attentive`` (keep the tokens an EMA image encoder attends to most).
        ema_decay: EMA decay of the attentive scorer (timm ``ModelEmaV3``).
        ema_warmup: ramp the decay up from 0 (timm's ``1 - (1 + step)^(-2/3)``), so that early in training the
            scorer follows the live encoder instead of ranking tokens with its random initialisation (which
            would keep the same positions in every image).
        unmasked_tuning: share of the training steps, at the end, that see every token (FLIP's unmasked
            tuning): closes the gap between masked training and full-image evaluation, which is large for
            attentive masking because the dropped tokens are always the same kind (background).
        optim: optimizer and schedule.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        image_size: int = 32,
        backbone_kwargs: dict | None = None,
        embed_dim: int = 128,
        text_width: int = 128,
        text_depth: int = 3,
        text_heads: int = 4,
        text_max_length: int = 77,
        vocab_size: int = CLIP_VOCAB_SIZE,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        mask_ratio: float = 0.0,
        masking: str = "random",
        ema_decay: float = 0.998,
        ema_warmup: bool = True,
        unmasked_tuning: float = 0.0,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.save_hyperparameters()
        if masking not in MASKINGS:
            raise ConfigError(f"model.masking '{masking}' is not one of {', '.join(MASKINGS)}")
        num_kept(1, mask_ratio)  # validates the ratio
        image_encoder = create_backbone(backbone, num_classes=0, image_size=image_size, **(backbone_kwargs or {}))
        if mask_ratio > 0 and not hasattr(image_encoder, "patch_embed"):
            raise ConfigError(f"token masking needs a ViT image tower; '{backbone}' has no patch tokens: set model.mask_ratio 0")
        text_encoder = TextTransformer(vocab_size, text_max_length, text_width, text_depth, text_heads)
        self.model = DualEncoder(image_encoder, text_encoder, embed_dim, init_logit_scale, max_logit_scale)
        if not 0.0 <= unmasked_tuning <= 1.0:
            raise ConfigError(f"model.unmasked_tuning {unmasked_tuning} must be a share of the steps in [0, 1]")
        self.mask_ratio, self.masking, self.ema_decay = mask_ratio, masking, ema_decay
        self.unmasked_tuning = unmasked_tuning
        self.ema_image_encoder = None
        if mask_ratio > 0 and masking == "attentive":
            self.ema_image_encoder = ModelEmaV3(image_encoder, decay=ema_decay, use_warmup=ema_warmup).eval()
        self.zeroshot_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.retrieval = RetrievalRecall((1, 5))
        self._zero_shot_head: torch.Tensor | None = None

    def optimizer_root(self) -> nn.Module:
        return self.model  # the EMA scorer is never optimised

    # --- training --------------------------------------------------------------------------------
    def keep_index(self, images: torch.Tensor) -> torch.Tensor | None:
        """Patch tokens the image tower sees this step (None = all).  # (B, K)"""
        if self.mask_ratio <= 0 or self.in_unmasked_tuning():
            return None
        num_tokens = self.model.image_encoder.patch_embed.num_patches
        keep = num_kept(num_tokens, self.mask_ratio)
        if self.masking == "attentive":
            return attentive_keep_index(vit_cls_attention(self.ema_image_encoder.module, images), keep)
        return random_keep_index(images.shape[0], num_tokens, keep, device=images.device)

    def in_unmasked_tuning(self) -> bool:
        """True in the final ``unmasked_tuning`` share of the training steps (of a fit)."""
        if self.unmasked_tuning <= 0 or self._trainer is None or not self.trainer.training:
            return False
        total = self.trainer.estimated_stepping_batches
        return self.global_step >= (1.0 - self.unmasked_tuning) * total

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, tokens = batch[0], batch[1]
        image_features = self.model.encode_image(images, self.keep_index(images))
        text_features = self.model.encode_text(tokens)
        image_all, text_all = gather_features(image_features, text_features)
        scale = self.model.logit_scale()
        loss = clip_loss(image_all, text_all, scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale.detach())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.model.logit_scale.clamp_()
        if self.ema_image_encoder is not None:
            self.ema_image_encoder.update(self.model.image_encoder, step=self.global_step)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ema_image_encoder is not None:
            self.ema_image_encoder.eval()
        return self

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def build_zero_shot_head(self, class_prompt_tokens: torch.Tensor) -> torch.Tensor:
        """(C, T, L) prompt tokens -> (C, E) prompt-ensemble classifier."""
        classes, templates, length = class_prompt_tokens.shape
        features = self.model.encode_text(class_prompt_tokens.view(-1, length).to(self.device))
        return zero_shot_head(features.view(classes, templates, -1))

    def _start_eval(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "class_prompt_tokens"):
            raise ConfigError("CLIPModule needs an image-text DataModule with class_prompt_tokens(): use datamodules.captions")
        self._zero_shot_head = self.build_zero_shot_head(datamodule.class_prompt_tokens())

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def _eval_step(self, batch, stage: str) -> None:
        images, tokens, labels, caption_ids = batch
        image_features, text_features = self.model.encode_image(images), self.model.encode_text(tokens)
        loss = clip_loss(image_features, text_features, self.model.logit_scale())
        self.zeroshot_acc1.update(zero_shot_logits(image_features, self._zero_shot_head), labels)
        self.retrieval.update(image_features, text_features, caption_ids)
        self.log(f"{stage}/loss", loss, sync_dist=True)

    def _end_eval(self, stage: str) -> None:
        self.log(f"{stage}/zeroshot_acc1", self.zeroshot_acc1.compute(), prog_bar=True)
        for name, value in self.retrieval.compute().items():
            self.log(f"{stage}/{name}", value)
        self.zeroshot_acc1.reset()
        self.retrieval.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")
