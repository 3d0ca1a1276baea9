"""Knowledge distillation into any timm student: MEAL V2 ensembles, stored sparse logits, FerKD, feature KD."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from modules.base import SupervisedModule
from modules.components.backbones import create_backbone, load_state_dict_strict
from modules.components.batches import named_batch
from modules.components.checkpoints import backbone_state_dict
from modules.components.kd.distill import kd_loss, student_tokens_and_logits
from modules.components.errors import ConfigError
from modules.components.kd.mixing import Mixing
from modules.components.kd.targets import FerKD, OnlineTeachers, TargetSource
from modules.components.kd.terms import KDStep, LossTerm
from modules.components.parts import record
from modules.components.optim import OptimConfig



class DistillationModule(SupervisedModule):
    """Distil soft targets into a timm student (MEAL V2, Shen & Savvides 2020; FKD/TinyViT; FerKD; ScaleKD).

    ``loss = kd_weight * T^2 KL(targets || student) + sum(term.weight * term)``. The targets come from an
    injected *target source* (``kd_targets.OnlineTeachers``: the mean tempered softmax of frozen teachers;
    ``kd_targets.StoredLogits``: top-k teacher probabilities replayed with their crops by
    ``datamodules.replay``, the true remainder on the other classes, no teacher forward), optionally
    calibrated (``kd_targets.FerKD``) and mixed with the crops (``kd_mixing``); the extra *terms* are
    ``kd_terms`` objects (hard labels, feature KD, MEAL V2's discriminator). Each is chosen by ``class_path``
    in YAML; ``training_step`` is: targets, calibration, mixing, then the weighted sum of the terms. The
    student is ``self.backbone`` (checkpoint keys ``backbone.*``, loadable by any technique's
    ``init_checkpoint`` or as a teacher).
    Teachers are frozen, always in eval mode, outside the optimizer and not saved in checkpoints: reloading
    rebuilds them from the target source's recorded arguments.

    Args:
        student: timm model name of the student.
        num_classes: classes (linked from the data).
        image_size: input size (linked from the data).
        student_kwargs: extra ``timm.create_model`` arguments for the student.
        init_checkpoint: visionlab checkpoint whose ``backbone.*`` weights initialise the student.
        targets: where the soft targets come from (default: ``OnlineTeachers`` with no teachers).
        calibration: optional per-crop calibration of the targets (``FerKD``).
        mixing: optional mixing of crops and targets by the same weights (``kd_mixing.SoftTargetMix``: FKD's
            mixup/CutMix; ``kd_mixing.SelfMix``: FerKD's, within one image).
        terms: extra weighted loss terms.
        temperature: softmax temperature T of targets and student.
        kd_weight: weight of the KL loss.
        optim: optimizer and schedule (``weight_decay`` may be 0, as MEAL V2 recommends).
    """

    def __init__(
        self,
        student: str = "resnet18",
        num_classes: int = 1000,
        image_size: int = 224,
        student_kwargs: dict | None = None,
        init_checkpoint: str | None = None,
        targets: TargetSource | None = None,
        calibration: FerKD | None = None,
        mixing: Mixing | None = None,
        terms: list[LossTerm] | None = None,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        targets = targets if targets is not None else OnlineTeachers()
        terms = list(terms or [])
        self.save_hyperparameters(ignore=["targets", "calibration", "mixing", "terms"])
        # primitives only (weights_only checkpoints), rebuilt by Lightning's CLI instantiator on reload
        self.hparams.update(targets=record(targets), calibration=record(calibration), mixing=record(mixing),
                            terms=record(terms),
                            _instantiator="lightning.pytorch.cli.instantiate_module")
        self.backbone = create_backbone(student, num_classes=num_classes, image_size=image_size, **(student_kwargs or {}))
        if init_checkpoint:
            load_state_dict_strict(self.backbone, backbone_state_dict(init_checkpoint), f"checkpoint {init_checkpoint}")
        self.targets, self.calibration, self.mixing, self.terms = targets, calibration, mixing, nn.ModuleList(terms)
        self.targets.bind(self)
        for term in terms:
            term.bind(self)
        layers = {term.feature_layer for term in terms if term.needs_tokens}
        if len(layers) > 1:
            raise ConfigError(f"feature terms ask for student features at different layers {sorted(layers, key=str)}: use one")
        self.needs_tokens, self.feature_layer = bool(layers), next(iter(layers), None)
        self.teacher_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self._teacher_evaluated = False

    @property
    def teachers(self) -> nn.ModuleList:
        """The target source's frozen teachers (empty with stored logits)."""
        return self.targets.teachers

    # --- teachers are `Frozen` inside the target source: eval mode, out of the optimizer and checkpoint ---
    def optimizer_root(self) -> nn.Module:
        return nn.ModuleDict({"backbone": self.backbone, "terms": self.terms}) if len(self.terms) else self.backbone

    # --- steps ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, num_classes)

    def distillation_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, parts to log)`` of one training batch: the targets, then the weighted sum of the terms."""
        batch, temperature = named_batch(batch), self.hparams.temperature
        targets = self.targets(batch, temperature)
        if self.calibration is not None:
            targets = self.calibration(targets, batch["label"])
        if self.mixing is not None:
            batch, targets = self.mixing(batch, targets)
        tokens = None
        if self.needs_tokens:
            tokens, logits = student_tokens_and_logits(self.backbone, batch["image"], self.feature_layer)
        else:
            logits = self(batch["image"])
        step = KDStep(batch, logits, targets, temperature, self.teachers, tokens)
        logs = {**targets.logs, "kd_loss": kd_loss(logits, targets.probs, temperature, targets.weights)}
        loss = self.hparams.kd_weight * logs["kd_loss"]
        for term in self.terms:
            logs[term.name] = term(step)
            loss = loss + term.weight * logs[term.name]
        return loss, logs

    def training_step(self, batch, batch_idx):
        loss, logs = self.distillation_loss(batch)
        for name, value in logs.items():
            self.log(f"train/{name}", value)
        self.log_training(loss)  # soft (mixed) targets: no training accuracy
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        batch = named_batch(batch)
        super().validation_step(batch, batch_idx, dataloader_idx)
        if self.teachers and not self._teacher_evaluated and self.eval_prefix(dataloader_idx) == "val":
            self.teacher_acc1(self.targets(batch, self.hparams.temperature).probs, batch["label"])  # measured once
            self.log("val/teacher_acc1", self.teacher_acc1)

    def on_validation_epoch_end(self) -> None:
        if self.teachers and not self.trainer.sanity_checking:
            self._teacher_evaluated = True

