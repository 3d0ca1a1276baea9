"""Parameter-efficient transfer of a frozen backbone with an injected method object.

Methods (``modules.components.peft.methods``, chosen by ``class_path``): linear probe, full fine-tune, SSF,
(low-bit) adapters, side-tuning. Task files: ``modules.components.peft.task_file``; the command line that
exports and loads them: ``app/peft_tool.py``.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
from torch import nn

from modules.base import SupervisedModule
from modules.components.backbones import create_backbone
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig
from modules.components.parts import record
from modules.components.peft.methods import PEFTMethod, SSFTuning, build_method
from modules.components.peft.task_file import read_task_file, write_task_file
from modules.components.transfer import build_from_checkpoint


class PEFTModule(SupervisedModule):
    """Transfer a (frozen) timm backbone with one parameter-efficient method; only the method's parameters
    and the head train. Methods: SSF (Lian et al. 2022), AdaptFormer and low-bit adapters (Jie et al. 2023),
    side-tuning after Hierarchical Side-Tuning (Lin et al. 2023), and the linear-probe / full fine-tune baselines.

    Args:
        backbone: timm model name (``vit_tiny_patch16_224``, ``resnet18``, ``convnext_atto``...); null with
            ``init_checkpoint``: the architecture the checkpoint records.
        num_classes: classes of the target task (linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments (``depth``, ``patch_size``...), merged over the
            checkpoint's recorded ones.
        init_checkpoint: visionlab checkpoint (or plain state dict, with ``backbone`` named) with the pretrained
            ``backbone.*`` weights (`transfer.build_from_checkpoint`); a head of another shape is replaced.
        method: the PEFT method (default: SSF); a ``{class_path, init_args}`` dict is accepted too.
        label_smoothing: label smoothing of the training loss (and of Mixup's targets).
        optim: optimizer and schedule.
        mixup_alpha: Mixup alpha; 0 disables (SSF's and AdaptFormer's ImageNet/FGVC recipes use timm's Mixup
            0.8 / CutMix 1.0; their VTAB-1k runs none).
        cutmix_alpha: CutMix alpha; 0 disables.
    """

    def __init__(
        self,
        backbone: str | None = None,
        num_classes: int = 1000,
        image_size: int = 224,
        backbone_kwargs: dict | None = None,
        init_checkpoint: str | None = None,
        method: PEFTMethod | None = None,
        label_smoothing: float = 0.0,
        optim: OptimConfig | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        self.method = build_method(method) if method is not None else SSFTuning()
        self.save_hyperparameters(ignore=["method"])
        self.hparams["method"] = record(self.method)  # primitives only: checkpoints load with weights_only=True
        self.label_smoothing = label_smoothing
        self.use_mixup(mixup_alpha, cutmix_alpha, label_smoothing)
        if init_checkpoint:
            self.backbone, arch = build_from_checkpoint(init_checkpoint, "replace", num_classes, image_size, backbone,
                                                        backbone_kwargs)
            self.hparams.update(backbone=arch.name, backbone_kwargs=arch.kwargs)  # what a task file rebuilds
        elif backbone is None:
            raise ConfigError("model.backbone is null: name a timm model, or set model.init_checkpoint to start from")
        else:
            self.backbone = create_backbone(backbone, num_classes=num_classes, image_size=image_size, **(backbone_kwargs or {}))
        pretrained = bool((backbone_kwargs or {}).get("pretrained_file") or (backbone_kwargs or {}).get("pretrained"))
        if not init_checkpoint and not pretrained and not self.method.trains_backbone:
            warnings.warn(f"PEFT method {type(self.method).__name__} on a randomly initialised backbone: set "
                          "init_checkpoint (or backbone_kwargs.pretrained_file)", stacklevel=2)
        self.side: nn.Module | None = None  # a side-tuning method's side network (set by its bind)
        self.method.bind(self)
        self.train()  # Lightning keeps the modes it finds: the frozen backbone must start in eval mode

    # --- the small interface used by callbacks and scripts ---------------------------------------
    def task_parameter_names(self) -> list[str]:
        """Names (in this module) of the parameters the method trains."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def task_bytes(self) -> int:
        """Storage of the task-specific tensors at their stated bits (low-bit adapters packed)."""
        return self.method.storage_bytes(self)

    def merged_backbone(self) -> nn.Module:
        """A plain timm model of the backbone's architecture (SSF folded into the weights)."""
        return self.method.merge(self.backbone)

    def export_task_file(self, path: str | os.PathLike) -> int:
        """Write the task-specific parameters (low-bit weights bit-packed) + the config to rebuild the model."""
        accepted = inspect.signature(PEFTModule.__init__).parameters
        config = {k: v for k, v in self.hparams.items() if k in accepted and k != "optim"}  # drops the CLI's _class_path etc.
        config["method"] = record(self.method)
        return write_task_file(path, config, *self.method.task_state(self))

    # --- Lightning -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if not self.method.trains_backbone:
            self.backbone.eval()  # frozen: norms keep their statistics, no dropout/drop-path
            for module in self.backbone.modules():  # ...but wholly trained modules (adapters: dropout) follow mode
                params = list(module.parameters())
                if params and all(p.requires_grad for p in params):
                    module.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.forward(self.backbone, self.side, images)  # (B, num_classes)

    def training_step(self, batch, batch_idx):
        return self.supervised_step(batch, self.label_smoothing)


def load_task_file(path: str | os.PathLike, init_checkpoint: str | None = None) -> PEFTModule:
    """Rebuild backbone (from ``init_checkpoint`` or the one recorded in the file) + task file, in eval mode."""
    config, params, quantized = read_task_file(path)
    if init_checkpoint is not None:
        config["init_checkpoint"] = init_checkpoint
    method = build_method(config["method"])
    if not config.get("init_checkpoint") and not method.trains_backbone:
        raise ConfigError(f"{path} was trained on a frozen backbone: pass the backbone checkpoint (init_checkpoint)")
    config["method"] = method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PEFTModule(**config)
    model.method.load_task_state(model, params, quantized)
    return model.eval()
