"""Parameter-efficient transfer of a frozen backbone: linear probe, full FT, SSF, (low-bit) adapters, side-tuning.

Also a small command line for task files::

    python -m modules.peft export --checkpoint runs/peft/ssf/checkpoints/last.ckpt --out task.pt
    python -m modules.peft load --task task.pt [--init-checkpoint backbone.ckpt] [--out model.pt]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from modules.base import VisionModule
from modules.components.backbones import create_backbone, load_state_dict_strict
from modules.components.checkpoints import allowlisted, backbone_state_dict, load_checkpoint
from modules.components.errors import ConfigError, VisionlabError
from modules.components.files import write_atomic
from modules.components.optim import OptimConfig
from modules.components.peft import (
    AdapterConfig,
    QuantLinear,
    SideConfig,
    SideNetwork,
    backbone_intermediates,
    insert_adapters,
    insert_ssf,
    merge_ssf,
    pack_bits,
    task_storage_bytes,
    unpack_bits,
    unwrap_state_dict,
)

METHODS = ("linear_probe", "full", "ssf", "adapter", "side")
TASK_FORMAT = "visionlab-peft-task/1"


class PEFTModule(VisionModule):
    """Transfer a (frozen) timm backbone with one parameter-efficient method; only the method's parameters
    and the head train. Implements SSF (Lian et al. 2022), AdaptFormer-style and low-bit adapters (Jie et al.
    2023) and Hierarchical Side-Tuning (Lin et al. 2023), next to the linear-probe and full fine-tune baselines.

    Args:
        backbone: timm model name (``vit_tiny_patch16_224``, ``resnet18``, ``convnext_atto``...).
        num_classes: classes of the target task (linked from the data).
        image_size: input size (linked from the data).
        backbone_kwargs: extra ``timm.create_model`` arguments (``depth``, ``patch_size``...).
        init_checkpoint: visionlab checkpoint (or plain state dict) with the pretrained ``backbone.*``
            weights; a head of another shape is replaced by a fresh one.
        method: ``linear_probe`` | ``full`` | ``ssf`` | ``adapter`` | ``side``.
        ssf_init_std: SSF init noise (scale ~ N(1, std), shift ~ N(0, std)).
        adapter: adapter settings (method ``adapter``).
        side: side-network settings (method ``side``).
        label_smoothing: label smoothing of the training loss.
        optim: optimizer and schedule.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        image_size: int = 224,
        backbone_kwargs: dict | None = None,
        init_checkpoint: str | None = None,
        method: str = "ssf",
        ssf_init_std: float = 0.02,
        adapter: AdapterConfig | None = None,
        side: SideConfig | None = None,
        label_smoothing: float = 0.0,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        if method not in METHODS:
            raise ConfigError(f"unknown PEFT method '{method}': pick one of {', '.join(METHODS)}")
        self.save_hyperparameters()
        self.method = method
        self.label_smoothing = label_smoothing
        self.backbone = create_backbone(backbone, num_classes=num_classes, image_size=image_size, **(backbone_kwargs or {}))
        if init_checkpoint:
            self._load_backbone(init_checkpoint)
        elif method != "full":
            warnings.warn(f"PEFT method '{method}' on a randomly initialised backbone: set init_checkpoint", stacklevel=2)
        self.backbone.requires_grad_(method == "full")
        self.head_name = self._classifier_name()
        self.side = None
        if method == "ssf":
            self.site_names = insert_ssf(self.backbone, exclude=(self.head_name,), init_std=ssf_init_std)
        elif method == "adapter":
            self.site_names = insert_adapters(self.backbone, adapter or AdapterConfig())
        if method == "side":
            side = side or SideConfig()
            self.backbone.reset_classifier(0)
            self.taps = side.taps if isinstance(side.taps, int) else list(side.taps)
            with torch.no_grad():
                probe = backbone_intermediates(self.backbone.eval(), torch.zeros(1, 3, image_size, image_size), self.taps)
            self.side = SideNetwork([f.shape[1] for f in probe], side.dim, num_classes)
        elif method != "full":
            self.backbone.get_classifier().requires_grad_(True)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.train()  # Lightning keeps the modes it finds: the frozen backbone must start in eval mode

    # --- construction --------------------------------------------------------------------------
    def _classifier_name(self) -> str:
        head = self.backbone.get_classifier()
        return next(name for name, module in self.backbone.named_modules() if module is head)

    def _load_backbone(self, path: str) -> None:
        """Load ``backbone.*`` weights; classifier weights of another shape (or absent) stay freshly initialised."""
        state = unwrap_state_dict(backbone_state_dict(path))
        own = self.backbone.state_dict()
        head = {f"{self._classifier_name()}.{k}" for k in self.backbone.get_classifier().state_dict()}
        state = {k: v for k, v in state.items() if not (k in head and (k not in own or own[k].shape != v.shape))}
        for k in head - state.keys():
            state[k] = own[k]
        load_state_dict_strict(self.backbone, state, f"checkpoint {path}")

    # --- the small interface used by callbacks and scripts ---------------------------------------
    def task_parameter_names(self) -> list[str]:
        """Names (in this module) of the parameters the method trains."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """Task-specific tensors: the trained parameters (full fine-tune: every backbone tensor incl. buffers)."""
        if self.method == "full":
            return {f"backbone.{k}": v.detach() for k, v in self.backbone.state_dict().items()}
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def task_bytes(self) -> int:
        """Storage of the task-specific tensors at their stated bits (low-bit adapters packed)."""
        if self.method == "full":
            return sum(v.numel() * v.element_size() for v in self.task_state_dict().values())
        return task_storage_bytes(self)

    def merged_backbone(self) -> nn.Module:
        """A plain timm model of the backbone's architecture (SSF folded into the weights)."""
        if self.method not in ("ssf", "linear_probe", "full"):
            raise ConfigError(f"method '{self.method}' adds modules to the backbone: only ssf, linear_probe and full merge into a plain model")
        return merge_ssf(copy.deepcopy(self.backbone)).eval()

    # --- task files ----------------------------------------------------------------------------
    def export_task_file(self, path: str | os.PathLike) -> int:
        """Write the task-specific parameters (low-bit weights bit-packed) + the config to rebuild the model.

        The write is atomic (temporary file + rename). Returns the file size in bytes.
        """
        params, quantized = {}, {}
        quant = {name: m for name, m in self.named_modules() if isinstance(m, QuantLinear) and m.weight.requires_grad}
        for name, tensor in self.task_state_dict().items():
            module_name, _, leaf = name.rpartition(".")
            if module_name in quant and leaf in ("weight", "step_gain"):
                continue
            params[name] = tensor.detach().cpu().clone()
        for name, module in quant.items():
            codes, step = module.codes_and_step()
            quantized[name] = {"bits": module.bits, "shape": list(codes.shape), "codes": pack_bits(codes, module.bits), "step": step.cpu()}
        accepted = inspect.signature(PEFTModule.__init__).parameters
        hp = {k: v for k, v in self.hparams.items() if k in accepted and k != "optim"}  # drops the CLI's _class_path etc.
        for key in ("adapter", "side"):
            if hp.get(key) is not None and not isinstance(hp[key], dict):
                hp[key] = asdict(hp[key])
        payload = {"format": TASK_FORMAT, "config": hp, "params": params, "quantized": quantized}
        return write_atomic(path, lambda tmp: torch.save(payload, tmp)).stat().st_size

    @torch.no_grad()
    def load_task_state(self, params: dict[str, torch.Tensor], quantized: dict[str, dict]) -> None:
        """Load what :meth:`export_task_file` wrote; every task tensor must be present."""
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        expected = set(self.task_state_dict())
        given = set(params) | {f"{n}.weight" for n in quantized}
        gains = {f"{n}.step_gain" for n in quantized if self.get_submodule(n).step_gain is not None}
        missing, unexpected = expected - given - gains, given - expected
        if missing or unexpected:
            raise ConfigError(f"task file does not match the model: missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
        for name, value in params.items():
            if tensors[name].shape != value.shape:
                raise ConfigError(f"task tensor {name} has shape {tuple(value.shape)}, the model expects {tuple(tensors[name].shape)}")
            tensors[name].copy_(value)
        for name, entry in quantized.items():
            shape = entry["shape"]
            codes = unpack_bits(entry["codes"], entry["bits"], int(torch.Size(shape).numel())).view(shape)
            self.get_submodule(name).load_quantized(codes, entry["step"])

    # --- Lightning -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.method != "full":
            self.backbone.eval()  # frozen: norms keep their statistics, no dropout/drop-path
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.side is not None:
            with torch.no_grad():
                features = backbone_intermediates(self.backbone, images, self.taps)  # [(B, C_i, H_i, W_i)]
            return self.side(features)
        return self.backbone(images)  # (B, num_classes)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.train_acc1(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.val_acc1(logits, labels)
        self.log("val/acc1", self.val_acc1, prog_bar=True)

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=-1)


def load_task_file(path: str | os.PathLike, init_checkpoint: str | None = None) -> PEFTModule:
    """Rebuild backbone (from ``init_checkpoint`` or the one recorded in the file) + task file, in eval mode."""
    payload = load_checkpoint(path, "task file")
    if payload.get("format") != TASK_FORMAT:
        raise ConfigError(f"{path} is not a visionlab PEFT task file")
    config = dict(payload["config"])
    if init_checkpoint is not None:
        config["init_checkpoint"] = init_checkpoint
    if not config.get("init_checkpoint") and config["method"] != "full":
        raise ConfigError(f"{path} was trained on a frozen backbone: pass the backbone checkpoint (init_checkpoint)")
    config["adapter"] = AdapterConfig(**config["adapter"]) if config.get("adapter") else None
    config["side"] = SideConfig(**config["side"]) if config.get("side") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PEFTModule(**config)
    model.load_task_state(payload["params"], payload["quantized"])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """``python -m modules.peft export|load``: write a task file from a checkpoint, or rebuild a model from one."""
    parser = argparse.ArgumentParser(prog="python -m modules.peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the task-specific parameters of a PEFT checkpoint")
    export.add_argument("--checkpoint", required=True, help="a .ckpt written by visionlab fit with PEFTModule")
    export.add_argument("--out", required=True, help="task file to write")
    load = sub.add_parser("load", help="rebuild backbone + task file into a working model")
    load.add_argument("--task", required=True, help="task file written by export")
    load.add_argument("--init-checkpoint", default=None, help="backbone checkpoint (default: the one recorded in the task file)")
    load.add_argument("--out", default=None, help="save the rebuilt model's state dict here (ssf/linear_probe/full: a plain timm state dict)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            if not Path(args.checkpoint).is_file():
                raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
            with warnings.catch_warnings(), allowlisted():
                warnings.simplefilter("ignore")
                model = PEFTModule.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True)
            size = model.export_task_file(args.out)
            print(f"peft: wrote {args.out} ({size} bytes; method {model.method}, {model.task_bytes()} bytes of task parameters)")
        else:
            model = load_task_file(args.task, args.init_checkpoint)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"peft: rebuilt {model.hparams.backbone} + {args.task} (method {model.method}, {trainable} task parameters)")
            if args.out:
                plain = model.method in ("ssf", "linear_probe", "full")
                state = model.merged_backbone().state_dict() if plain else model.state_dict()
                write_atomic(args.out, lambda tmp: torch.save(state, tmp))
                print(f"peft: saved {'plain timm' if plain else 'PEFTModule'} state dict to {args.out}")
    except VisionlabError as err:
        print(f"peft: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
