"""CLIP dual encoder with FLIP / Attentive Mask CLIP token dropping, zero-shot and retrieval evaluation.

Implements CLIP (Radford et al., 2021) with FLIP random image-token dropping (Li et al., 2023) and
Attentive Mask CLIP token keeping (Yang et al., 2023), open_clip's ``local_loss`` and ``accum_freq``; the
sigmoid loss of SigLIP (Zhai et al., 2023) and pretrained, locked or partly unlocked towers (LiT, Zhai et al., 2022).

Attentive Mask CLIP here is the paper's token selection only: its optional self-supervised losses (SimCLR
and BYOL heads on two online views, an EMA text tower) are not implemented, and the online view is a crop
taken on the batch from the loader's image (the scorer's full view), not a second crop of the original
photo. Tokens are kept in 2x2 blocks as A-CLIP's (``AttentiveMasking(selection="blocks")``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities import dim_zero_cat

from modules.base import VisionModule
from modules.components.backbones import create_backbone
from modules.components.batches import named_batch
from modules.components.clip.loss import ClipLoss, ContrastiveLoss, accumulated_contrastive_backward, split_micro_batches
from modules.components.clip.towers import HFTextEncoder, lock_tower, unwrapped
from modules.components.contrastive import recall_at_k, zero_shot_head, zero_shot_logits
from modules.components.errors import ConfigError
from modules.components.masked_vit import encode_pooled
from modules.components.transfer import build_from_checkpoint
from modules.components.optim import OptimConfig
from modules.components.parts import as_part, record
from modules.components.clip.text import CLIP_VOCAB_SIZE, TextTransformer, local_model_dir
from modules.components.clip.token_masking import TokenMasking



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
    """Image tower + text tower (each possibly ``Frozen``), linear projections to a shared space, L2 norm, and the
    loss with its learnable temperature (``logit_scale``; SigLIP's bias too)."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int, loss: ContrastiveLoss):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_projection = nn.Linear(unwrapped(image_encoder).num_features, embed_dim, bias=False)
        self.text_projection = nn.Linear(unwrapped(text_encoder).num_features, embed_dim, bias=False)
        self.loss = loss

    @property
    def logit_scale(self) -> nn.Module:
        return self.loss.logit_scale

    @property
    def image_trunk(self) -> nn.Module:
        """The image network itself (inside its ``Frozen`` wrapper when locked): what token masking drives."""
        return unwrapped(self.image_encoder)

    def encode_image(self, images: torch.Tensor, keep_index: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.image_encoder(images) if keep_index is None else encode_pooled(self.image_trunk, images, keep_index)
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
        init_logit_scale: initial inverse temperature of the default loss (CLIP: 1/0.07).
        max_logit_scale: the default loss's inverse temperature never exceeds this (CLIP: 100).
        masking: the image-token dropping in training, by ``class_path``
            (`modules.components.clip.token_masking`): ``RandomMasking`` (FLIP), ``AttentiveMasking`` (A-CLIP:
            keep the tokens an EMA image encoder attends to most), each with its ``ratio``, or ``GridMasking``
            (MAE's grid-wise sampling, one token per ``stride`` x ``stride`` cell); None = every token.
        local_loss: the default loss's ``local_loss``: under DDP, each rank scores only its own rows against the
            gathered features (open_clip): (B, world*B) logits instead of (world*B)^2, the same gradients.
        loss: the loss by ``class_path`` (`modules.components.clip.loss`): ``ClipLoss`` (softmax, the default,
            built from the three arguments above) or ``SigLipLoss`` (sigmoid; learnable temperature and bias).
            Give the temperature and ``local_loss`` to the loss object then, not to the module.
        image_checkpoint: a visionlab checkpoint whose backbone (headless) becomes the image tower instead of
            ``backbone`` (e.g. a ViT a classification or MAE run trained; ``backbone_kwargs`` merge over its own).
        text_tower: a pretrained text tower by ``class_path``: ``HFTextEncoder`` (a local Hugging Face encoder,
            its pooling named; the data must use the same model's tokenizer, ``ClassPrompts(tokenizer=...)``).
            None = visionlab's own text transformer from the ``text_*`` arguments, trained from scratch.
        lock_image: freeze the image tower (LiT): whole (``Frozen``: eval mode, outside the optimizer and the
            checkpoint, rebuilt from ``backbone_kwargs.pretrained_file`` / ``image_checkpoint`` on load) or all but
            its last ``lock_image_unlocked_groups`` timm layer groups (then kept in the checkpoint).
        lock_image_unlocked_groups: layer groups, from the top, that stay trainable in a locked image tower.
        lock_text: freeze the text tower, the same way (a pretrained one is rebuilt from its ``source``).
        lock_text_unlocked_groups: text layer groups (transformer layers) that stay trainable when locked.
        accum_freq: split each training batch into this many micro-batches and accumulate their gradients
            with feature caching (open_clip): the loss sees the negatives of the whole batch while only one
            micro-batch's activations are kept. Uses manual optimization; dropout/drop-path draws are not
            replayed between the caching and the gradient pass (as open_clip).
        unmasked_tuning: share of the training steps, at the end, that see every token (FLIP's unmasked
            tuning): closes the gap between masked training and full-image evaluation, which is large for
            attentive masking because the dropped tokens are always the same kind (background).
        optim: optimizer and schedule.
    """

    weight_decay_rule = "open_clip"  # open_clip main.py: < 2-d, norms, biases, logit_scale exempt; pos. embeddings decay

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
        masking: TokenMasking | None = None,
        local_loss: bool = False,
        accum_freq: int = 1,
        unmasked_tuning: float = 0.0,
        optim: OptimConfig | None = None,
        loss: ContrastiveLoss | None = None,
        image_checkpoint: str | None = None,
        text_tower: HFTextEncoder | None = None,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_groups: int = 0,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        masking = as_part(masking, TokenMasking, "model.masking")
        loss = as_part(loss, ContrastiveLoss, "model.loss")
        text_tower = as_part(text_tower, HFTextEncoder, "model.text_tower")
        self.save_hyperparameters(ignore=["masking", "loss", "text_tower"])
        for name, part in (("masking", masking), ("loss", loss), ("text_tower", text_tower)):
            self.hparams[name] = record(part)  # primitives: weights_only reads
        if loss is None:
            loss = ClipLoss(init_logit_scale, max_logit_scale, local_loss)
        elif (init_logit_scale, max_logit_scale, local_loss) != (1 / 0.07, 100.0, False):
            raise ConfigError("model.init_logit_scale / max_logit_scale / local_loss configure the default loss: "
                              "with model.loss set, give them to the loss's init_args")
        if image_checkpoint is not None:
            image_encoder, _ = build_from_checkpoint(image_checkpoint, head="drop", image_size=image_size,
                                                     backbone_kwargs=backbone_kwargs, what="model.image_checkpoint")
        else:
            image_encoder = create_backbone(backbone, num_classes=0, image_size=image_size, **(backbone_kwargs or {}))
        text_encoder = text_tower or TextTransformer(vocab_size, text_max_length, text_width, text_depth, text_heads)
        image_encoder = lock_tower(image_encoder, lock_image, lock_image_unlocked_groups, "model.lock_image")
        text_encoder = lock_tower(text_encoder, lock_text, lock_text_unlocked_groups, "model.lock_text")
        self.model = DualEncoder(image_encoder, text_encoder, embed_dim, loss)
        if not 0.0 <= unmasked_tuning <= 1.0:
            raise ConfigError(f"model.unmasked_tuning {unmasked_tuning} must be a share of the steps in [0, 1]")
        if accum_freq < 1:
            raise ConfigError(f"model.accum_freq {accum_freq} must be at least 1")
        self.masking = masking
        if masking is not None:
            masking.bind(self)
        self.local_loss, self.accum_freq = local_loss, accum_freq
        self.automatic_optimization = accum_freq == 1
        self.unmasked_tuning = unmasked_tuning
        self.zeroshot_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.retrieval = RetrievalRecall((1, 5))
        self._zero_shot_head: torch.Tensor | None = None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before the loss objects held the temperature name it model.logit_scale.*
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("model.logit_scale.")]:
            state[key.replace("model.logit_scale.", "model.loss.logit_scale.", 1)] = state.pop(key)

    def optimizer_root(self) -> nn.Module:
        return self.model  # the masking's EMA scorer is never optimised

    # --- training --------------------------------------------------------------------------------
    def masked_view(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The images the online tower sees this step and their kept patch tokens (None = all).  # (B, K)"""
        if self.masking is None or self.masking.ratio <= 0 or self.in_unmasked_tuning():
            return images, None
        return self.masking.view(images, self.model.image_trunk)

    def keep_index(self, images: torch.Tensor) -> torch.Tensor | None:
        """Patch tokens kept this step (None = all), for the view ``masked_view`` returns.  # (B, K)"""
        return self.masked_view(images)[1]

    def total_steps(self) -> int:
        """Optimizer steps of this fit (0 when unknown: no trainer, or an unbounded run)."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return 0 if not total or total == float("inf") else int(total)

    def in_unmasked_tuning(self) -> bool:
        """True in the final ``unmasked_tuning`` share of the training steps (of a fit)."""
        if self.unmasked_tuning <= 0 or self._trainer is None or not self.trainer.training:
            return False
        total = self.trainer.estimated_stepping_batches
        return self.global_step >= (1.0 - self.unmasked_tuning) * total

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.accum_freq > 1:
            return self._accumulated_training_step(batch)
        batch = named_batch(batch)
        images, tokens = batch["image"], batch["tokens"]
        view, keep_index = self.masked_view(images)
        image_features = self.model.encode_image(view, keep_index)
        text_features = self.model.encode_text(tokens)
        loss = self.model.loss(image_features, text_features)
        self.log("train/loss", loss, prog_bar=True)
        self.log_temperature()
        return loss

    def log_temperature(self) -> None:
        self.log("train/logit_scale", self.model.logit_scale().detach())
        if hasattr(self.model.loss, "logit_bias"):
            self.log("train/logit_bias", self.model.loss.logit_bias.detach())

    def _accumulated_training_step(self, batch) -> torch.Tensor:
        """One optimizer step over ``accum_freq`` micro-batches with feature caching (manual optimization)."""
        batch = named_batch(batch)
        try:
            micro = split_micro_batches([batch["image"], batch["tokens"]], self.accum_freq)
        except ValueError as error:
            raise ConfigError(f"model.accum_freq: {error}: set data batch_size to a multiple of accum_freq") from None
        views = [(*self.masked_view(images), tokens) for images, tokens in micro]  # token masks fixed per micro-batch

        def encode(j: int) -> tuple[torch.Tensor, torch.Tensor]:
            view, keep_index, tokens = views[j]
            return self.model.encode_image(view, keep_index), self.model.encode_text(tokens)

        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = accumulated_contrastive_backward(encode, self.accum_freq, self.model.loss.inputs, self.model.loss.compute,
                                                self.manual_backward)
        optimizer.step()
        self.lr_scheduler_step(self.lr_schedulers(), None)
        self.log("train/loss", loss, prog_bar=True)
        self.log_temperature()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.model.loss.clamp_()
        if self.masking is not None:
            self.masking.update(self.model.image_trunk, self.global_step, self.total_steps())

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
        self.check_tokenizer(datamodule)
        self._zero_shot_head = self.build_zero_shot_head(datamodule.class_prompt_tokens())
        classes = self._zero_shot_head.shape[0]
        if classes != self.zeroshot_acc1.num_classes:  # zero-shot on other classes than trained (unseen-class transfer)
            self.zeroshot_acc1 = MulticlassAccuracy(classes, top_k=1, average="micro").to(self.device)

    def check_tokenizer(self, datamodule) -> None:
        """The captions must be tokenised for this text tower: CLIP's BPE for visionlab's own, the model's own
        tokenizer for a Hugging Face one."""
        text_tower = unwrapped(self.model.text_encoder)
        wanted = getattr(text_tower, "source", None)
        given = getattr(getattr(datamodule, "batches", None), "tokenizer_source", None)
        if (wanted is None) != (given is None) or (wanted is not None and local_model_dir(wanted) != local_model_dir(given)):
            raise ConfigError(f"the data tokenises captions with {given or 'CLIP BPE'} but the text tower needs "
                              f"{wanted or 'CLIP BPE'}: set data.init_args.batches.init_args.tokenizer to {wanted or 'clip'}")

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.check_tokenizer(datamodule)

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def _eval_step(self, batch, stage: str) -> None:
        batch = named_batch(batch)
        images, tokens = batch["image"], batch["tokens"]
        labels, caption_ids = batch["label"], batch["caption_id"]
        image_features, text_features = self.model.encode_image(images), self.model.encode_text(tokens)
        loss = self.model.loss.batch_loss(image_features, text_features)
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
