"""The thin shared base of every technique: optimizer/schedule wiring, loss guard, image logging."""

from __future__ import annotations

import inspect
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.utils import make_grid

from modules.components.batches import named_batch
from modules.components.errors import ConfigError, NonFiniteLossError
from modules.components.mim.masking import fixed_generator
from modules.components.optim import OptimConfig, build_optimizer, build_scheduler, global_batch_size, peak_lr


class VisionModule(pl.LightningModule):
    """Base LightningModule: subclasses build networks and implement ``training_step``/``validation_step``.

    Every technique takes ``num_classes`` and ``image_size`` so the CLI can link them from the data.
    Subclasses may override ``optimizer_root()`` to choose the module whose trainable parameters are
    optimised (e.g. a backbone with ``group_matcher`` for layer-wise lr decay).

    Args:
        num_classes: classes of the labelled data (linked from the DataModule).
        image_size: input resolution (linked from the DataModule).
        optim: optimizer and schedule settings.
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 224, optim: OptimConfig | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.optim = optim or OptimConfig()

    # --- interface used by callbacks -------------------------------------------------------------
    def optimizer_root(self) -> nn.Module:
        """Module whose trainable parameters the optimizer owns (default: the whole LightningModule)."""
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.optimizer_root().parameters() if p.requires_grad]

    #: set to ``"raw"`` by the averaging callbacks (``callbacks/averaging.py``) while they evaluate the raw weights
    eval_weights: str = ""

    def eval_prefix(self, dataloader_idx: int = 0) -> str:
        """Log namespace of an evaluation batch: ``val`` for the data's main set, ``val_<name>`` for its
        ``extra_eval`` set number ``dataloader_idx``, with ``_raw`` after ``val`` while the raw weights of an
        EMA/SWA run are evaluated (``val_raw``, ``val_raw_<name>``).

        A technique evaluates several sets by taking ``dataloader_idx=0`` in ``validation_step`` and logging
        under this prefix with ``add_dataloader_idx=False`` (``ClassificationModule`` does).
        """
        parts = ["val", self.eval_weights] if self.eval_weights else ["val"]
        if dataloader_idx:
            datamodule = self.trainer.datamodule
            names = datamodule.eval_sets() if hasattr(datamodule, "eval_sets") else []
            parts.append(names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx))
        return "_".join(parts)

    @staticmethod
    def evaluates_sets(step) -> bool:
        """Whether an evaluation step logs per set (takes ``dataloader_idx``, see ``eval_prefix``)."""
        return "dataloader_idx" in inspect.signature(step).parameters

    # --- Lightning hooks -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``configs/trainer/fsdp.yaml``), shard with FSDP2.

        Each transformer block is one unit, then each top-level network (see ``shard_blocks``). Under any
        other strategy there is no device mesh and nothing changes.
        """
        if self.device_mesh is not None:
            from modules.components.sharding import shard_blocks

            shard_blocks(self, self.device_mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ConfigError(
                f"the model has {self.num_classes} classes but the data has {data_classes}: "
                f"set model num_classes to {data_classes} (the CLI links it from the data automatically)"
            )
        if getattr(self.trainer.datamodule, "extra_eval", None) and not self.evaluates_sets(self.validation_step):
            raise ConfigError(f"data.extra_eval needs a technique that logs each evaluation set on its own; "
                              f"{type(self).__name__} does not (ClassificationModule does): drop data.extra_eval")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trained_for = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if trained_for is not None and trained_for != self.num_classes:
            raise ConfigError(
                f"the checkpoint was trained for {trained_for} classes but this model/data has {self.num_classes}: "
                "use data with the same classes, or start from it with model.init_checkpoint (a new head is made)"
            )

    def configure_optimizers(self):
        total_steps = self.trainer.estimated_stepping_batches  # also loads the train dataloader
        lr = peak_lr(self.optim, self.global_batch_size() if self.optim.lr_base_batch is not None else None)
        optimizer = build_optimizer(self.optimizer_root(), self.optim, lr=lr, default_rule=getattr(self, "weight_decay_rule", None))
        steps_per_epoch = max(1, math.ceil(total_steps / max(1, self.trainer.max_epochs or 1)))
        scheduler = build_scheduler(optimizer, self.optim, total_steps, steps_per_epoch, lr=lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def global_batch_size(self) -> int:
        """Samples per optimizer step: the data's per-device batch x devices x nodes x accumulation."""
        trainer = self.trainer
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch is None:
            if trainer.train_dataloader is None:  # not loaded yet when max_steps fixes the step count
                trainer.fit_loop.setup_data()  # what Trainer.estimated_stepping_batches does itself
            batch = getattr(trainer.train_dataloader, "batch_size", None)
        if batch is None:
            raise ConfigError("optim.lr_base_batch scales the lr by the global batch, but the per-device batch size "
                              "is unknown (no datamodule.batch_size or train_dataloader.batch_size): set lr_base_batch null")
        return global_batch_size(batch, trainer.world_size, trainer.accumulate_grad_batches)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss is {loss.detach().float().item()} at step {self.global_step}: lower optim.lr, "
                "set trainer.gradient_clip_val, or check the inputs for NaN"
            )

    # --- logging helpers -------------------------------------------------------------------------
    def log_images(self, tag: str, images: torch.Tensor, nrow: int = 8) -> None:
        """Log a (N, C, H, W) batch as one grid image to TensorBoard (min-max scaled per image)."""
        logger = self.logger
        if not isinstance(logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        images = images.detach().float().cpu()
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        hi = images.amax(dim=(1, 2, 3), keepdim=True)
        grid = make_grid((images - lo) / (hi - lo).clamp_min(1e-6), nrow=nrow)
        logger.experiment.add_image(tag, grid, global_step=self.global_step)


def accuracy_metrics(num_classes: int) -> nn.ModuleDict:
    """Top-1 (and top-5 when there are more than 5 classes) micro accuracy."""
    metrics = {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return nn.ModuleDict(metrics)


class SupervisedModule(VisionModule):
    """The supervised path of classification, KD, the linear probe and PEFT: one evaluation step and one set of
    metrics, so ``data.extra_eval`` (ReaL, other validation sets), the EMA/SWA raw-weight evaluation
    (``val_raw/...``) and top-1/top-5 work the same in all four. A subclass's ``forward(images)`` returns logits.
    Classification, the probe and PEFT train through :meth:`supervised_step` (Mixup/CutMix, label smoothing or an
    injected criterion); KD computes its own loss (its mixing mixes teacher targets too) and calls
    :meth:`log_training`.
    """

    mixup: Mixup | None = None  # set by use_mixup

    def __init__(self, num_classes: int = 1000, image_size: int = 224, optim: OptimConfig | None = None):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.train_metrics = accuracy_metrics(num_classes)
        self.val_metrics = accuracy_metrics(num_classes)
        self.extra_val_metrics = nn.ModuleDict()  # per extra evaluation set / raw weights (eval_metrics)

    def use_mixup(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float) -> None:
        """timm's ``Mixup`` (per batch, the training batch size must be even) when either alpha is positive; its
        soft targets carry ``label_smoothing``."""
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ConfigError(f"model.mixup_alpha {mixup_alpha} and cutmix_alpha {cutmix_alpha} must be >= 0 (0: off)")
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                               num_classes=self.num_classes)

    def supervised_step(self, batch, label_smoothing: float = 0.0, criterion: nn.Module | None = None) -> torch.Tensor:
        """One training step on a labelled batch: Mixup/CutMix when on, then ``criterion(logits, target)`` (index
        labels, or mixup's soft targets) or cross-entropy with ``label_smoothing`` (soft-target cross-entropy under
        mixup, whose targets carry the smoothing); logs through :meth:`log_training`."""
        batch = named_batch(batch)
        images, labels = batch["image"], batch["label"]
        self.check_labels(labels)
        if self.mixup is not None:
            if len(images) % 2:
                raise ConfigError(f"Mixup/CutMix needs an even training batch, got {len(images)}: set an even "
                                  "data.batch_size (per device)")
            images, target = self.mixup(images, labels)  # (B, C) soft targets
        else:
            target = labels
        logits = self(images)
        if criterion is not None:
            loss = criterion(logits, target)
        elif self.mixup is not None:
            loss = SoftTargetCrossEntropy()(logits, target)
        else:
            loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        self.log_training(loss, logits, labels if self.mixup is None else None)
        return loss

    def check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and labels.ndim == 1 and int(labels.max()) >= self.num_classes:
            raise ConfigError(f"label {int(labels.max())} out of range for a {self.num_classes}-class model: "
                              "the model's num_classes must match the data")

    def log_training(self, loss: torch.Tensor, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        """``train/loss``, ``train/lr`` and, for hard labels, the training accuracies."""
        if logits is not None and labels is not None and labels.ndim == 1:
            for name, metric in self.train_metrics.items():
                metric(logits, labels)
                self.log(f"train/{name}", metric, on_step=False, on_epoch=True)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def eval_metrics(self, prefix: str) -> nn.ModuleDict:
        """The accuracy metrics of one evaluation set / weight set (``eval_prefix``): each accumulates its own."""
        if prefix == "val":
            return self.val_metrics
        if prefix not in self.extra_val_metrics:  # made on first use: the sets come from the data
            self.extra_val_metrics[prefix] = accuracy_metrics(self.num_classes).to(self.device)
        return self.extra_val_metrics[prefix]

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        batch = named_batch(batch)
        images, labels = batch["image"], batch["label"]
        self.check_labels(labels)
        logits = self(images)
        prefix = self.eval_prefix(dataloader_idx)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, labels), sync_dist=True, add_dataloader_idx=False)
        for name, metric in self.eval_metrics(prefix).items():
            metric(logits, labels)
            attribute = f"val_metrics.{name}" if prefix == "val" else f"extra_val_metrics.{prefix}.{name}"
            self.log(f"{prefix}/{name}", metric, prog_bar=prefix == "val" and name == "acc1", add_dataloader_idx=False,
                     metric_attribute=attribute)  # Lightning indexes metric attributes once: name new ones
        if batch_idx == 0 and prefix == "val":
            self.log_images("val/examples", images[:32])
        return logits

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch, batch_idx):
        return self(named_batch(batch)["image"]).softmax(dim=-1)


class MaskedPretrainingModule(VisionModule):
    """Shared train/val steps of masked-image pretraining (SimMIM, MAE, MR-MAE).

    Subclasses implement ``reconstruct(images, generator=None) -> dict`` holding a scalar ``loss`` (its
    ``*_loss`` parts are logged too) and ``_log_grid(tag, images, out)``; ``self.log_every`` is the
    training-step period of the TensorBoard image grid. Validation masks come from a fixed seed per batch,
    so ``val/loss`` is comparable across epochs.
    """

    log_every: int = 0

    def _log_losses(self, stage: str, out: dict) -> None:
        for key, value in out.items():
            if key == "loss" or key.endswith("_loss"):
                self.log(f"{stage}/{key}", value, prog_bar=key == "loss" and stage in {"train", "val"},
                         sync_dist=stage != "train", add_dataloader_idx=False)

    def training_step(self, batch, batch_idx):
        images = named_batch(batch)["image"]
        out = self.reconstruct(images)
        self._log_losses("train", out)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.log_every and self.global_step % self.log_every == 0:
            self._log_grid("mim/recon", images, out)
        return out["loss"]

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        images = named_batch(batch)["image"]
        out = self.reconstruct(images, fixed_generator(images.device, batch_idx))
        prefix = self.eval_prefix(dataloader_idx)
        self._log_losses(prefix, out)
        if batch_idx == 0 and prefix == "val":
            self._log_grid("mim/val_recon", images, out)
