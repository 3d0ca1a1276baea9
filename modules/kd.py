"""Knowledge distillation into any timm student: MEAL V2 ensembles, stored sparse logits, FerKD, feature KD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from modules.base import VisionModule
from modules.components.backbones import create_backbone, load_state_dict_strict
from modules.components.checkpoints import backbone_state_dict
from modules.components.distill import (
    CrossAttentionProjector,
    Discriminator,
    LinearProjector,
    build_teacher,
    ensemble_soft_targets,
    feature_kd_loss,
    feature_tokens,
    ferkd_calibrate,
    kd_loss,
    sparse_soft_targets,
)
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig

PROJECTORS = ("auto", "cross_attention", "linear")


class DistillationModule(VisionModule):
    """Distil frozen teachers into a timm student (MEAL V2, Shen & Savvides 2020; FKD/TinyViT; FerKD; ScaleKD).

    ``loss = kd_weight * T^2 KL(targets || student) + hard_weight * CE(labels)
    + feature_weight * MSE(projector(student features), teacher features) + discriminator_weight * BCE``.
    Targets are the mean of the teachers' tempered softmaxes, or, when a training batch is
    ``(images, labels, topk_values, topk_indices)`` (``datamodules.replay.ReplayDataModule``), the stored
    sparse teacher logits: then no teacher runs and ``teachers`` may be empty. With ``ferkd`` the targets are
    calibrated per crop by the teacher's confidence on the true class. The student is ``self.backbone``
    (checkpoint keys ``backbone.*``, loadable by any technique's ``init_checkpoint`` or as a teacher).
    Teachers are frozen, always in eval mode, outside the optimizer and not saved in checkpoints: reloading
    rebuilds them from their specs; ``load_from_checkpoint(path, teachers=[])`` gives the student alone
    (not with feature KD, whose projector is sized from its teacher).

    Args:
        student: timm model name of the student.
        num_classes: classes (linked from the data).
        image_size: input size (linked from the data).
        student_kwargs: extra ``timm.create_model`` arguments for the student.
        teachers: each a visionlab classifier checkpoint path, a timm name (random init: tests only) or
            an ``nn.Module`` producing (B, num_classes) logits.
        teacher_kwargs: extra ``timm.create_model`` arguments for teachers given by name.
        init_checkpoint: visionlab checkpoint whose ``backbone.*`` weights initialise the student.
        temperature: softmax temperature T of targets and student.
        kd_weight: weight of the KL loss.
        hard_weight: weight of the hard-label cross-entropy (MEAL V2: 0).
        label_smoothing: label smoothing of the hard-label term.
        ferkd: calibrate targets by teacher confidence (``components.distill.ferkd_calibrate``).
        ferkd_low: below this teacher confidence on the true class a crop is a hard negative.
        ferkd_high: at or above it a crop is an easy positive.
        ferkd_smoothing: label smoothing of the softened hard labels given to hard negatives.
        ferkd_negative_weight: loss weight of hard negatives.
        ferkd_easy_weight: loss weight of easy positives.
        sparse_rest_mass: stored-logits mode: mass spread over the classes outside the stored top-k.
        feature_weight: weight of feature distillation from the first teacher (0 disables).
        feature_layer: ``None`` for the final feature map, or an index into ``forward_intermediates``
            (the same index for student and teacher).
        projector: ``cross_attention`` (ScaleKD), ``linear``, or ``auto`` (cross-attention for token
            teachers (ViT), linear for CNN teachers).
        discriminator_weight: weight of the MEAL V2 output discriminator loss (0 disables).
        optim: optimizer and schedule (``weight_decay`` may be 0, as MEAL V2 recommends).
    """

    def __init__(
        self,
        student: str = "resnet18",
        num_classes: int = 1000,
        image_size: int = 224,
        student_kwargs: dict | None = None,
        teachers: list[str | nn.Module] | None = None,
        teacher_kwargs: dict | None = None,
        init_checkpoint: str | None = None,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        hard_weight: float = 0.0,
        label_smoothing: float = 0.0,
        ferkd: bool = False,
        ferkd_low: float = 0.2,
        ferkd_high: float = 0.9,
        ferkd_smoothing: float = 0.3,
        ferkd_negative_weight: float = 1.0,
        ferkd_easy_weight: float = 1.0,
        sparse_rest_mass: float = 0.0,
        feature_weight: float = 0.0,
        feature_layer: int | None = None,
        projector: str = "auto",
        discriminator_weight: float = 0.0,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        if projector not in PROJECTORS:
            raise ConfigError(f"unknown projector '{projector}': pick one of {', '.join(PROJECTORS)}")
        teachers = list(teachers or [])
        self.save_hyperparameters(ignore=["teachers"])
        self.hparams["teachers"] = [t if isinstance(t, str) else type(t).__name__ for t in teachers]
        self.backbone = create_backbone(student, num_classes=num_classes, image_size=image_size, **(student_kwargs or {}))
        if init_checkpoint:
            load_state_dict_strict(self.backbone, backbone_state_dict(init_checkpoint), f"checkpoint {init_checkpoint}")
        self.teachers = nn.ModuleList(build_teacher(t, num_classes, image_size, teacher_kwargs) for t in teachers)
        self._check_teacher_outputs()
        self.projector = self._build_projector(projector) if feature_weight > 0 else None
        self.discriminator = Discriminator(num_classes) if discriminator_weight > 0 else None
        self.val_metrics = nn.ModuleDict({"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro")})
        if num_classes > 5:
            self.val_metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.teacher_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self._teacher_evaluated = False
        self.train()  # Lightning keeps the modes it finds: the teachers must start in eval mode

    # --- construction --------------------------------------------------------------------------
    def _probe(self) -> torch.Tensor:
        return torch.zeros(2, 3, self.image_size, self.image_size)

    @torch.no_grad()
    def _check_teacher_outputs(self) -> None:
        for i, teacher in enumerate(self.teachers):
            classes = teacher(self._probe()).shape[-1]
            if classes != self.num_classes:
                raise ConfigError(f"teacher {i} outputs {classes} classes but the data has {self.num_classes}: "
                                  "use teachers trained on the same classes")

    @torch.no_grad()
    def _build_projector(self, kind: str) -> nn.Module:
        if not self.teachers:
            raise ConfigError("feature_weight > 0 needs an online teacher: pass model.teachers (stored logits carry no features)")
        self.backbone.eval()
        student = self.student_features(self._probe())[0]  # (B, N_s, D_s)
        self.backbone.train()
        teacher = self.teacher_features(self._probe())  # (B, N_t, D_t)
        if kind == "auto":
            kind = "cross_attention" if self.teachers[0].forward_features(self._probe()).ndim == 3 else "linear"
        if kind == "cross_attention":
            return CrossAttentionProjector(student.shape[-1], teacher.shape[-1], teacher.shape[1])
        return LinearProjector(student.shape[-1], teacher.shape[-1], student.shape[1], teacher.shape[1])

    # --- teachers: frozen, eval mode, out of the optimizer and the checkpoint ----------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teachers.eval()
        return self

    def optimizer_root(self) -> nn.Module:
        extra = {name: module for name, module in (("projector", self.projector), ("discriminator", self.discriminator)) if module is not None}
        return nn.ModuleDict({"backbone": self.backbone, **extra}) if extra else self.backbone

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("teachers.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.teachers.state_dict().items():
            state.setdefault(f"teachers.{key}", value)

    # --- forward pieces ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, num_classes)

    def student_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(feature tokens (B, N_s, D_s), logits (B, C))`` of the student in one forward pass."""
        layer = self.hparams.feature_layer
        if layer is None:
            features = self.backbone.forward_features(images)
            return feature_tokens(self.backbone, features), self.backbone.forward_head(features)
        final, (inter,) = self.backbone.forward_intermediates(images, indices=[layer])
        return feature_tokens(self.backbone, inter), self.backbone.forward_head(final)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        teacher, layer = self.teachers[0], self.hparams.feature_layer
        if layer is None:
            return feature_tokens(teacher, teacher.forward_features(images))  # (B, N_t, D_t)
        (inter,) = teacher.forward_intermediates(images, indices=[layer], intermediates_only=True)
        return feature_tokens(teacher, inter)

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the teachers' tempered softmaxes, (B, C)."""
        if not self.teachers:
            raise ConfigError("no teachers and the batch has no stored logits: pass model.teachers or use datamodules.replay.ReplayDataModule")
        return ensemble_soft_targets([teacher(images) for teacher in self.teachers], self.hparams.temperature)

    # --- steps ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        images, labels = batch[0], batch[1]
        if len(batch) == 4:  # stored sparse logits: no teacher forward
            if hp.feature_weight > 0:
                raise ConfigError("feature KD needs an online teacher: set model.feature_weight 0 with stored logits")
            targets = sparse_soft_targets(batch[2], batch[3], self.num_classes, hp.temperature, hp.sparse_rest_mass)
        else:
            targets = self.teacher_targets(images)
        weights = None
        if hp.ferkd:
            confidence = targets.gather(1, labels[:, None]).squeeze(1)  # (B,) teacher probability of the true class
            self.log("train/ferkd_negatives", (confidence < hp.ferkd_low).float().mean())
            targets, weights = ferkd_calibrate(targets, labels, hp.ferkd_low, hp.ferkd_high, hp.ferkd_smoothing,
                                               hp.ferkd_negative_weight, hp.ferkd_easy_weight)
        if self.projector is not None:
            tokens, logits = self.student_features(images)
            feat_loss = feature_kd_loss(self.projector(tokens), self.teacher_features(images))
            self.log("train/feat_loss", feat_loss)
        else:
            logits, feat_loss = self(images), 0.0
        distill = kd_loss(logits, targets, hp.temperature, weights)
        loss = hp.kd_weight * distill + hp.feature_weight * feat_loss
        if hp.hard_weight > 0:
            hard = F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
            self.log("train/hard_loss", hard)
            loss = loss + hp.hard_weight * hard
        if self.discriminator is not None:
            disc = self.discriminator.loss(logits.float().softmax(-1), targets)
            self.log("train/disc_loss", disc)
            loss = loss + hp.discriminator_weight * disc
        self.log("train/kd_loss", distill)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        for name, metric in self.val_metrics.items():
            metric(logits, labels)
            self.log(f"val/{name}", metric, prog_bar=name == "acc1")
        if self.teachers and not self._teacher_evaluated:  # the teachers do not change: measure once
            self.teacher_acc1(self.teacher_targets(images), labels)
            self.log("val/teacher_acc1", self.teacher_acc1)

    def on_validation_epoch_end(self) -> None:
        if self.teachers and not self.trainer.sanity_checking:
            self._teacher_evaluated = True

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=-1)
