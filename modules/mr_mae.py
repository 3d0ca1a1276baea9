"""MR-MAE: Mimic before Reconstruct: Enhancing Masked Autoencoders with Feature Mimicking (Gao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from modules.base import MaskedPretrainingModule
from modules.components.errors import ConfigError
from modules.components.frozen import Frozen
from modules.components.mim.masking import gather_tokens, reconstruction_rows
from modules.components.mim.encoders import (
    frozen_encoder,
    mae_encoder_decoder,
    mae_reconstruct,
    teacher_tokens,
)
from modules.components.optim import OptimConfig
from modules.components.parts import record
from modules.components.tokens import feature_mimic_loss


@dataclass
class MimicTeacher:
    """One frozen MR-MAE teacher (the paper mimics CLIP *and* DINO features: a list of these).

    Args:
        name: timm model name (never downloaded); default (null) with a ``checkpoint``: the architecture the
            checkpoint records.
        checkpoint: a visionlab checkpoint (or plain state dict, with ``name``) with the teacher's
            ``backbone.*`` weights; ``None`` keeps a random teacher of ``name`` (smoke tests only).
        kwargs: extra ``timm.create_model`` arguments (merged over the checkpoint's recorded ones).
        mean: the normalisation this teacher was trained with (0..1 scale); its input is the image
            re-normalised from the student's statistics to these. ``None``: the student's input as is.
        std: see ``mean``.
        weight: weight of this teacher's mimic loss.
        projection_dim: hidden width of its 2-layer projection from the student; 0 for one linear layer.
    """

    name: str | None = None
    checkpoint: str | None = None
    kwargs: dict | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    weight: float = 1.0
    projection_dim: int = 0


class MRMAEModule(MaskedPretrainingModule):
    """MR-MAE pretraining: MAE plus mimic losses of the encoder's visible tokens against frozen teachers.

    ``loss = recon_weight * MSE(masked patches) + mimic_weight * sum_i w_i * MSE(proj_i(visible), teacher_i)``.
    Teachers (timm models by name, optionally loaded from visionlab checkpoints) are frozen, kept in eval
    mode, outside the optimizer, and left out of saved checkpoints (they are rebuilt from the config).
    Encoder and decoder are MAE's (`modules.mae.MAEModule`: reference init, fixed sin-cos position embeddings).

    Args:
        backbone: timm ViT name of the student encoder.
        num_classes: classes of the data (only sizes the unused classifier; linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments for the student.
        teacher: the single-teacher case: timm model name of the teacher (used when ``teachers`` is None);
            null with ``teacher_checkpoint``: the architecture that checkpoint records.
        teacher_checkpoint: its checkpoint (see `MimicTeacher.checkpoint`).
        teacher_kwargs: its extra ``timm.create_model`` arguments.
        teachers: several teachers, each with its own input normalisation, projection and weight; when
            given, ``teacher``/``teacher_checkpoint``/``teacher_kwargs``/``projection_dim`` are unused.
        input_mean: the normalisation the data applied to the student's images (needed by teachers with
            their own ``mean``/``std``); ``None`` reads the datamodule's ``mean``/``std`` hyper-parameters
            at setup (ImageNet's when it has none).
        input_std: see ``input_mean``.
        mask_ratio: fraction of patches hidden from the encoder.
        norm_pix_loss: per-patch normalised pixel targets.
        recon_weight: weight of the pixel reconstruction loss.
        mimic_weight: overall weight of the feature mimic losses.
        projection_dim: the single teacher's projection hidden width; 0 for a single linear layer.
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        learned_pos_embed: trained instead of fixed sin-cos position embeddings (see `MAEModule`).
        log_images_every_n_steps: period of the ``mim/recon`` image grid; 0 disables.
        optim: optimizer and schedule.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        image_size: int = 224,
        backbone_kwargs: dict | None = None,
        teacher: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher_kwargs: dict | None = None,
        teachers: list[MimicTeacher] | None = None,
        input_mean: tuple[float, float, float] | None = None,
        input_std: tuple[float, float, float] | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        recon_weight: float = 1.0,
        mimic_weight: float = 1.0,
        projection_dim: int = 0,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        learned_pos_embed: bool = False,
        log_images_every_n_steps: int = 500,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        if teachers is None:
            specs = [MimicTeacher(teacher, teacher_checkpoint, teacher_kwargs, projection_dim=projection_dim)]
        else:  # dicts when rebuilt from a checkpoint's hyper-parameters
            specs = [t if isinstance(t, MimicTeacher) else MimicTeacher(**t) for t in teachers]
        if not specs:
            raise ConfigError("MR-MAE needs at least one teacher: set model.teacher or a non-empty model.teachers")
        self.save_hyperparameters()
        if teachers is not None:  # primitives, so that weights_only=True checkpoint reads accept them
            self.hparams["teachers"] = record(specs)
        self.backbone, self.decoder, self.grid_size = mae_encoder_decoder(
            backbone, num_classes, image_size, backbone_kwargs, "MR-MAE", decoder_dim, decoder_depth, decoder_heads,
            learned_pos_embed)
        self.specs = specs
        # Frozen: eval mode, never optimised, rebuilt from the specs on load instead of checkpointed
        self.frozen_teachers = Frozen(nn.ModuleList(frozen_encoder(s.name, image_size, s.checkpoint, s.kwargs) for s in specs))
        self.projections = nn.ModuleList(self._projection(s, t.num_features) for s, t in zip(specs, self.teachers))
        self.input_stats = (input_mean, input_std) if input_mean is not None and input_std is not None else None
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.recon_weight, self.mimic_weight = recon_weight, mimic_weight
        self.log_every = log_images_every_n_steps

    def _projection(self, spec: MimicTeacher, teacher_dim: int) -> nn.Module:
        dim = self.backbone.embed_dim
        if spec.projection_dim:
            return nn.Sequential(nn.Linear(dim, spec.projection_dim), nn.GELU(), nn.Linear(spec.projection_dim, teacher_dim))
        return nn.Linear(dim, teacher_dim)

    # --- teachers stay frozen, in eval mode and out of checkpoints -----------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.input_stats is None:
            hparams = getattr(self.trainer.datamodule, "hparams", None) or {}
            self.input_stats = (tuple(hparams.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(hparams.get("std", IMAGENET_DEFAULT_STD)))

    @property
    def teachers(self) -> nn.ModuleList:
        return self.frozen_teachers.module

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for key in [k for k in state if k.startswith(("teacher.", "projection."))]:  # single-teacher checkpoints
            value = state.pop(key)
            if key.startswith("projection."):
                state["projections.0." + key.removeprefix("projection.")] = value

    # --- steps -------------------------------------------------------------------------------------
    def teacher_input(self, images: torch.Tensor, spec: MimicTeacher) -> torch.Tensor:
        """The student's normalised images re-normalised to the teacher's own mean/std."""
        if spec.mean is None or spec.std is None:
            return images
        mean, std = self.input_stats or (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

        def stats(values) -> torch.Tensor:
            return torch.tensor(values, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

        return (images * stats(std) + stats(mean) - stats(spec.mean)) / stats(spec.std)

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = mae_reconstruct(self.backbone, self.decoder, images, self.mask_ratio, self.norm_pix_loss, generator)
        visible = out["latent"][:, self.backbone.num_prefix_tokens:]  # (B, K, D)
        out["recon_loss"] = out["loss"]
        mimic = []
        for spec, teacher, projection in zip(self.specs, self.teachers, self.projections):
            with torch.no_grad():
                target = teacher_tokens(teacher, self.teacher_input(images, spec), self.grid_size)  # (B, N, D_t)
            target = gather_tokens(target, out["ids_keep"])  # (B, K, D_t)
            mimic.append(spec.weight * feature_mimic_loss(projection(visible), target))
        if len(mimic) > 1:
            out.update({f"mimic{i}_loss": loss for i, loss in enumerate(mimic)})
        out["mimic_loss"] = torch.stack(mimic).sum()
        out["loss"] = self.recon_weight * out["recon_loss"] + self.mimic_weight * out["mimic_loss"]
        return out

    def _log_grid(self, tag: str, images: torch.Tensor, out: dict) -> None:
        rows = reconstruction_rows(images, out["pixel_mask"], out["reconstruction"])
        self.log_images(tag, rows, nrow=rows.shape[0] // 3)
