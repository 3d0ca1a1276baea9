"""Quantization callbacks: QAT int8, PTQ int8 (+ layer-wise calibration), BitNet b1.58, HAWQ mixed precision.

Independent of techniques: they act on ``pl_module.backbone`` when the module has one, else on the module,
and read batches through the trainer's own dataloaders and batch-transfer hooks. The quantized results are
kept on the callback (``int8_model``, ``bits``...) and written under ``<default_root_dir>/quantized/``.
Mixed precision and the Hessian estimate need ``model(images) -> logits`` (classification-style backbones).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from modules.components import quant
from modules.components.errors import ConfigError


def target_module(pl_module: pl.LightningModule) -> nn.Module:
    """The network a quantization callback acts on: ``pl_module.backbone`` when present, else the module."""
    return getattr(pl_module, "backbone", pl_module)


def set_target_module(pl_module: pl.LightningModule, module: nn.Module) -> None:
    if hasattr(pl_module, "backbone"):
        pl_module.backbone = module
    else:
        raise ConfigError(f"{type(pl_module).__name__} has no 'backbone' attribute to replace with a quantized model")


def example_input(pl_module: pl.LightningModule, batch_size: int = 2) -> torch.Tensor:
    size = int(getattr(pl_module, "image_size", 224))
    return torch.randn(batch_size, 3, size, size, device=pl_module.device)


def training_batches(trainer: pl.Trainer, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (images, labels) batches of the training data after the DataModule's device transfer hooks."""
    loader = trainer.train_dataloader
    if loader is None:
        if trainer.datamodule is None:
            raise ConfigError("quantization calibration needs training data: run it from fit with a DataModule")
        loader = trainer.datamodule.train_dataloader()
    batches = []
    for batch in itertools.islice(iter(loader), count):
        batch = trainer.lightning_module._apply_batch_transfer_handler(batch)
        batches.append((batch[0], batch[1]))
    return batches


def output_dir(trainer: pl.Trainer, path: str | None) -> Path:
    folder = Path(path) if path else Path(trainer.default_root_dir) / "quantized"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class QuantizationAwareTraining(Callback):
    """Fake-quant int8 training from ``start_epoch`` on, then conversion to a real int8 CPU model.

    torchao's pt2e QAT flow: the backbone is exported and weights are fake-quantized per output channel
    (symmetric), activations per tensor (affine), with conv+BN folded, for CNNs and for the Linear layers of
    ViTs; the optimizer is rebuilt if export created new Parameter objects. At the end of fit the fake-quant
    network is converted into ``self.int8_model`` and saved as ``int8.pt2`` (``torch.export.load(path).module()``;
    ``quant.compile_int8`` lowers it to x86 int8 kernels).
    Checkpoints written after ``start_epoch`` hold the fake-quant graph's keys; resuming them is not supported.

    Args:
        start_epoch: epoch at whose start fake quantization is inserted.
        output: folder for ``int8.pt2`` (default ``<default_root_dir>/quantized``).
    """

    def __init__(self, start_epoch: int = 0, output: str | None = None):
        self.start_epoch, self.output = start_epoch, output
        self.int8_model: nn.Module | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.start_epoch or isinstance(target_module(pl_module), torch.fx.GraphModule):
            return
        model = target_module(pl_module)
        before = {id(p) for p in model.parameters()}
        prepared = quant.prepare_int8(model, example_input(pl_module), qat=True)
        set_target_module(pl_module, prepared)
        if {id(p) for p in prepared.parameters()} != before:  # new tensors: give the optimizer the new ones
            trainer.strategy.setup_optimizers(trainer)
        rank_zero_info(f"QAT: fake-quant int8 inserted at epoch {trainer.current_epoch}")

    def on_fit_end(self, trainer, pl_module) -> None:
        prepared = target_module(pl_module)
        if not isinstance(prepared, torch.fx.GraphModule):
            return
        self.int8_model = quant.convert_int8(prepared)
        if trainer.is_global_zero:
            path = output_dir(trainer, self.output) / "int8.pt2"
            quant.save_int8(self.int8_model, example_input(pl_module).cpu(), path)
            rank_zero_info(f"QAT: int8 model ({quant.model_bytes(self.int8_model)} bytes) saved to {path}")


class PostTrainingQuantization(Callback):
    """int8 PTQ at the end of fit (torchao pt2e): calibration over ``calibration_batches`` training batches.

    The result (``self.int8_model``) is saved as ``int8.pt2``, a torch.export program.

    Args:
        calibration_batches: batches the activation observers see.
        layerwise: first tune each Linear/Conv2d so its int8 output matches its float output (AdaQuant).
        layerwise_steps: Adam steps per layer for ``layerwise``.
        dynamic: int8 Linear layers with activation ranges computed per token at run time instead of calibrated
            (default: for models without convolutions, e.g. ViTs, whose activation outliers make static
            per-tensor int8 inaccurate).
        output: folder for ``int8.pt2``.
    """

    def __init__(self, calibration_batches: int = 16, layerwise: bool = False, layerwise_steps: int = 100,
                 dynamic: bool | None = None, output: str | None = None):
        self.calibration_batches, self.layerwise, self.layerwise_steps = calibration_batches, layerwise, layerwise_steps
        self.dynamic, self.output = dynamic, output
        self.int8_model: nn.Module | None = None

    def quantize(self, model: nn.Module, images: list[torch.Tensor]) -> nn.Module:
        """An int8 copy of ``model`` calibrated on ``images`` (the model itself is left unchanged)."""
        model = copy.deepcopy(model).cpu().eval()
        images = [x.cpu() for x in images]
        if self.layerwise:
            quant.calibrate_layerwise(model, images, steps=self.layerwise_steps, skip=())
        if self.dynamic or (self.dynamic is None and not quant.is_convolutional(model)):
            return quant.quantize_linear_dynamic_int8(model)
        prepared = quant.prepare_int8(model, images[0])
        quant.calibrate(prepared, images)
        return quant.convert_int8(prepared)

    def on_fit_end(self, trainer, pl_module) -> None:
        images = [x for x, _ in training_batches(trainer, self.calibration_batches)]
        self.int8_model = self.quantize(target_module(pl_module), images)
        if trainer.is_global_zero:
            path = output_dir(trainer, self.output) / "int8.pt2"
            quant.save_int8(self.int8_model, images[0].cpu(), path)
            rank_zero_info(f"PTQ: int8 model ({quant.model_bytes(self.int8_model)} bytes) saved to {path}")


class BitNet(Callback):
    """BitNet b1.58: ternary {-1, 0, +1} x per-channel scale weights in Linear/Conv2d layers during training.

    Layers are swapped when fit starts (same Parameter objects and state-dict keys, so checkpoints and resume
    work); gradients pass straight through the rounding. At the end of fit the ternary codes and scales are
    exported to ``ternary.pt``.

    Args:
        method: ``absmean`` (BitNet b1.58) or ``median`` (BitNet b1.58 Reloaded) weight scale.
        activation_bits: absmax activation bits (8 in the paper); ``None`` for float activations.
        skip: layer names kept in float (default: the timm model's stem conv and classifier).
        output: folder for ``ternary.pt``.
    """

    def __init__(self, method: str = "absmean", activation_bits: int | None = 8, skip: list[str] | None = None,
                 output: str | None = None):
        quant.ternary_scale(torch.ones(1, 1), method)  # validates the method name early
        self.method, self.activation_bits, self.skip, self.output = method, activation_bits, skip, output
        self.swapped: list[str] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.swapped = quant.to_bitnet(target_module(pl_module), self.method, self.activation_bits, self.skip)
        rank_zero_info(f"BitNet: {len(self.swapped)} ternary layers ({self.method})")

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            path = output_dir(trainer, self.output) / "ternary.pt"
            torch.save(quant.export_ternary(target_module(pl_module)), path)
            rank_zero_info(f"BitNet: ternary weights saved to {path}")


class MixedPrecision(Callback):
    """HAWQ-style per-layer weight bit-widths under a size budget, chosen at the end of fit.

    Each Linear/Conv2d weight's Hessian trace is estimated with Hutchinson's method on a few training
    batches; bits are then lowered greedily where the trace-weighted quantization error grows least, until
    the quantized layers fit ``budget`` x their fp32 size. The table of chosen bits is printed and saved as
    ``mixed_precision.json``; ``self.quantized_model`` holds a copy with the weights fake-quantized.

    Args:
        budget: size of the quantized layers as a fraction of their fp32 bytes (0.125 = all 4-bit on average).
        choices: allowed bit-widths.
        hessian_batches: batches for the trace estimate.
        samples: Rademacher vectors per batch.
        skip: layers left in float (default: none, every Linear/Conv2d gets bits).
        output: folder for ``mixed_precision.json``.
    """

    def __init__(self, budget: float = 0.125, choices: list[int] | None = None, hessian_batches: int = 2,
                 samples: int = 8, skip: list[str] | None = None, output: str | None = None):
        self.budget, self.choices = budget, list(choices or [2, 4, 8])
        self.hessian_batches, self.samples, self.skip, self.output = hessian_batches, samples, skip or [], output
        self.bits: dict[str, int] = {}
        self.traces: dict[str, float] = {}
        self.quantized_model: nn.Module | None = None

    def choose(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
        """Estimate traces on ``batches`` and allocate bits for ``model`` (which is not modified)."""
        self.traces = quant.layer_hessian_traces(model, batches, self.skip, self.samples)
        weights = {name: layer.weight.detach() for name, layer in quant.quantizable_layers(model, self.skip).items()}
        budget_bytes = self.budget * sum(w.numel() * 4 for w in weights.values())
        self.bits = quant.allocate_bits(self.traces, weights, budget_bytes, self.choices)
        self.quantized_model = copy.deepcopy(model)
        quant.apply_weight_bits(self.quantized_model, self.bits)
        return self.bits

    def table(self) -> str:
        rows = [f"{'layer':40s} {'params':>9s} {'trace/param':>12s} {'bits':>4s}"]
        for name, bits in self.bits.items():
            numel = self.quantized_model.get_submodule(name).weight.numel()
            rows.append(f"{name:40s} {numel:9d} {self.traces[name] / numel:12.3e} {bits:4d}")
        return "\n".join(rows)

    def on_fit_end(self, trainer, pl_module) -> None:
        batches = training_batches(trainer, self.hessian_batches)
        self.choose(target_module(pl_module), batches)
        if trainer.is_global_zero:
            rank_zero_info("MixedPrecision: chosen bits per layer\n" + self.table())
            path = output_dir(trainer, self.output) / "mixed_precision.json"
            path.write_text(json.dumps({"bits": self.bits, "traces": self.traces, "budget": self.budget}, indent=1))
