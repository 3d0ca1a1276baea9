"""Quantization callbacks: QAT int8, PTQ int8 (+ layer-wise calibration), BitNet b1.58, HAWQ mixed precision.

Independent of techniques: they act on ``pl_module.backbone`` when the module has one, else on the module,
and read batches through the trainer's own dataloaders and the module's public batch-transfer hooks. The
quantized results are kept on the callback (``int8_model``, ``bits``...) and written atomically under
``<default_root_dir>/quantized/``. Mixed precision and the Hessian estimate need ``model(images) -> logits``
(classification-style backbones).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from modules.components.quant import hawq

from modules.components.quant import int8 as quant

from modules.components.quant import ternary
from modules.components.batches import named_batch
from modules.components.errors import ConfigError
from modules.components.files import write_atomic


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


def images_and_labels(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a named batch (``image``/``label`` keys)."""
    batch = named_batch(batch)
    return batch["image"], batch["label"]


def training_batches(trainer: pl.Trainer, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (images, labels) batches of the training data, moved and prepared as in training.

    The module's public hooks run in Lightning's order (before transfer, transfer, after transfer); the
    trainer points them at the DataModule's overrides, which normalise the uint8 loader output.
    """
    pl_module = trainer.lightning_module
    loader = trainer.train_dataloader
    if loader is None:
        if trainer.datamodule is None:
            raise ConfigError("quantization calibration needs training data: run it from fit with a DataModule")
        loader = trainer.datamodule.train_dataloader()
    batches = []
    for batch in itertools.islice(iter(loader), count):
        batch = pl_module.on_before_batch_transfer(batch, 0)
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        batches.append(images_and_labels(pl_module.on_after_batch_transfer(batch, 0)))
    return batches


def output_dir(trainer: pl.Trainer, path: str | None) -> Path:
    return Path(path) if path else Path(trainer.default_root_dir) / "quantized"


def save_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``quant.save_int8`` through an atomic write (a crash never leaves a truncated ``.pt2``)."""
    write_atomic(path, lambda tmp: quant.save_int8(model, example.cpu(), tmp))


class QuantizationAwareTraining(Callback):
    """Fake-quant int8 training from ``start_epoch`` on, then conversion to a real int8 CPU model.

    torchao's pt2e QAT flow: the backbone is exported and weights are fake-quantized per output channel
    (symmetric), activations per tensor (affine), with conv+BN folded, for CNNs and for the Linear layers of
    ViTs; the optimizer is rebuilt if export created new Parameter objects. As in the standard recipe
    (torchvision's QAT reference, PyTorch's pt2e QAT tutorial: on 10 epochs, BN frozen for the last 5 and
    observers for the last 4), the final part of QAT runs with BatchNorm statistics frozen (normalising with
    the running statistics the int8 model will fold) and then with the observers frozen (fixed scales).
    At the end of fit the network is converted into ``self.int8_model`` and saved as ``int8.pt2``
    (``torch.export.load(path).module()``; ``quant.compile_int8`` lowers it to x86 int8 kernels).
    Checkpoints written after ``start_epoch`` hold the fake-quant graph's keys; resuming them is not supported.

    Args:
        start_epoch: epoch at whose start fake quantization is inserted.
        freeze_bn_after: fraction of the QAT optimizer steps after which BN statistics freeze (None: never).
        freeze_observers_after: fraction of the QAT steps after which the observers freeze (None: never).
        output: folder for ``int8.pt2`` (default ``<default_root_dir>/quantized``).
    """

    def __init__(self, start_epoch: int = 0, freeze_bn_after: float | None = 0.5,
                 freeze_observers_after: float | None = 0.6, output: str | None = None):
        for name, value in (("freeze_bn_after", freeze_bn_after), ("freeze_observers_after", freeze_observers_after)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"QuantizationAwareTraining.{name} = {value}: use a fraction in [0, 1] or null")
        self.start_epoch, self.output = start_epoch, output
        self.freeze_bn_after, self.freeze_observers_after = freeze_bn_after, freeze_observers_after
        self.int8_model: nn.Module | None = None
        self.qat_start_step: int | None = None
        self.bn_frozen_at: int | None = None
        self.observers_frozen_at: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.start_epoch or isinstance(target_module(pl_module), torch.fx.GraphModule):
            return
        model = target_module(pl_module)
        before = {id(p) for p in model.parameters()}
        prepared = quant.prepare_int8(model, example_input(pl_module), qat=True)
        set_target_module(pl_module, prepared)
        if {id(p) for p in prepared.parameters()} != before:  # new tensors: give the optimizer the new ones
            trainer.strategy.setup_optimizers(trainer)
        self.qat_start_step = trainer.global_step
        rank_zero_info(f"QAT: fake-quant int8 inserted at epoch {trainer.current_epoch}")

    def _reached(self, trainer, fraction: float | None) -> bool:
        if fraction is None or self.qat_start_step is None:
            return False
        total = trainer.estimated_stepping_batches - self.qat_start_step
        return trainer.global_step >= self.qat_start_step + fraction * total

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        prepared = target_module(pl_module)
        if not isinstance(prepared, torch.fx.GraphModule):
            return
        if self.bn_frozen_at is not None or self._reached(trainer, self.freeze_bn_after):
            quant.freeze_batchnorm_statistics(prepared)  # again after each .train(), which unfreezes the graph
            if self.bn_frozen_at is None:
                self.bn_frozen_at = trainer.global_step
                rank_zero_info(f"QAT: BatchNorm statistics frozen at step {trainer.global_step}")
        if self.observers_frozen_at is None and self._reached(trainer, self.freeze_observers_after):
            quant.freeze_observers(prepared)
            self.observers_frozen_at = trainer.global_step
            rank_zero_info(f"QAT: observers frozen at step {trainer.global_step}")

    def on_fit_end(self, trainer, pl_module) -> None:
        prepared = target_module(pl_module)
        if not isinstance(prepared, torch.fx.GraphModule):
            return
        self.int8_model = quant.convert_int8(prepared)
        if trainer.is_global_zero:
            path = output_dir(trainer, self.output) / "int8.pt2"
            save_program(self.int8_model, example_input(pl_module), path)
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
            save_program(self.int8_model, images[0], path)
            rank_zero_info(f"PTQ: int8 model ({quant.model_bytes(self.int8_model)} bytes) saved to {path}")


class BitNet(Callback):
    """BitNet b1.58 training: ternary weights and normalised 8-bit activations in Linear/Conv2d layers.

    Layers are swapped when fit starts (same Parameter objects and state-dict keys, so checkpoints and resume
    work); gradients pass straight through the rounding. At the end of fit the model is written to
    ``ternary.pt`` with its ternary weights packed at 2 bits each (``ternary.load_ternary`` reads it back);
    ``self.file_bytes`` is that file's size.

    Args:
        weight_scale: ternary scale; default ``ternary.AbsMean()`` per tensor (the paper); variants
            ``AbsMean(per_channel=True)``, ``AbsMedian()`` (BitNet b1.58 Reloaded).
        input_norm: parameter-free norm of each layer's input before the activation quantizer; default
            ``ternary.RMSNorm()`` (BitLinear), ``ternary.LayerNorm()``, or null for none.
        activation_bits: absmax activation bits per token (8 in the paper); null for float activations.
        skip: layer names kept in float (default: the timm model's stem conv and classifier).
        output: folder for ``ternary.pt``.
    """

    def __init__(self, weight_scale: ternary.TernaryScale | None = None,
                 input_norm: ternary.RMSNorm | ternary.LayerNorm | None = ternary.RMSNorm(),
                 activation_bits: int | None = 8, skip: list[str] | None = None, output: str | None = None):
        self.weight_scale = weight_scale or ternary.AbsMean()
        self.input_norm, self.activation_bits, self.skip, self.output = input_norm, activation_bits, skip, output
        self.swapped: list[str] = []
        self.file_bytes: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.swapped = ternary.to_bitnet(target_module(pl_module), self.weight_scale, self.activation_bits,
                                         self.input_norm, self.skip)
        rank_zero_info(f"BitNet: {len(self.swapped)} ternary layers ({self.weight_scale})")

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            payload = ternary.ternary_state(target_module(pl_module))
            path = write_atomic(output_dir(trainer, self.output) / "ternary.pt", lambda tmp: torch.save(payload, tmp))
            self.file_bytes = os.path.getsize(path)
            rank_zero_info(f"BitNet: packed ternary model ({self.file_bytes} bytes, 2 bits per ternary weight) "
                           f"saved to {path}")


class MixedPrecision(Callback):
    """HAWQ per-layer weight bit-widths under a size budget, chosen at the end of fit.

    Each Linear/Conv2d weight's Hessian trace is estimated with Hutchinson's method on a few training
    batches, drawing until the estimate converges (PyHessian's tolerance rule); bits are then allocated by an
    exact multiple-choice knapsack so that all quantized layers fit ``budget`` x their fp32 size with the
    least trace-weighted quantization error (``hawq.allocate_bits``). As in HAWQ-V3, the first conv and the
    classifier stay at ``pinned_bits`` (8) and count towards the budget. The table of chosen bits is printed
    and saved as ``mixed_precision.json``; ``self.quantized_model`` holds a copy with the weights fake-quantized.

    Args:
        budget: size of the quantized layers as a fraction of their fp32 bytes (0.125 = all 4-bit on average).
        choices: allowed bit-widths.
        hessian_batches: batches for the trace estimate (the Hessian of their mean loss).
        tol: relative change of the running trace estimate at which drawing stops (PyHessian: 1e-3).
        max_samples: upper bound on Rademacher draws per layer (PyHessian: 100).
        pinned: layers fixed at ``pinned_bits`` (default: the timm model's stem conv and classifier); [] for none.
        pinned_bits: their bit-width.
        skip: layers left in float and outside the budget (default: none).
        output: folder for ``mixed_precision.json``.
    """

    def __init__(self, budget: float = 0.125, choices: list[int] | None = None, hessian_batches: int = 2,
                 tol: float = 1e-3, max_samples: int = 100, pinned: list[str] | None = None, pinned_bits: int = 8,
                 skip: list[str] | None = None, output: str | None = None):
        self.budget, self.choices = budget, list(choices or [2, 4, 8])
        self.hessian_batches, self.tol, self.max_samples = hessian_batches, tol, max_samples
        self.pinned, self.pinned_bits, self.skip, self.output = pinned, pinned_bits, skip or [], output
        self.bits: dict[str, int] = {}
        self.traces: dict[str, float | None] = {}
        self.samples: dict[str, int] = {}
        self.quantized_model: nn.Module | None = None

    def choose(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
        """Estimate traces on ``batches`` and allocate bits for ``model`` (which is not modified)."""
        layers = quant.quantizable_layers(model, self.skip)
        pinned = hawq.pinned_layers(model, quant.default_skip(model) if self.pinned is None else self.pinned, self.skip)
        free = [n for n in layers if n not in pinned]
        traces, self.samples = hawq.layer_hessian_traces(model, batches, free, self.tol, self.max_samples)
        self.traces = {n: traces.get(n) for n in layers}  # None: pinned, not estimated
        weights = {name: layer.weight.detach() for name, layer in layers.items()}
        budget_bytes = self.budget * sum(w.numel() * 4 for w in weights.values())
        fixed = dict.fromkeys(pinned, self.pinned_bits)
        self.bits = hawq.allocate_bits(traces, weights, budget_bytes, self.choices, fixed)
        self.quantized_model = copy.deepcopy(model)
        hawq.apply_weight_bits(self.quantized_model, self.bits)
        return self.bits

    def table(self) -> str:
        rows = [f"{'layer':40s} {'params':>9s} {'trace/param':>12s} {'draws':>5s} {'bits':>4s}"]
        for name, bits in self.bits.items():
            numel = self.quantized_model.get_submodule(name).weight.numel()
            trace = self.traces[name]
            per_param = f"{trace / numel:12.3e}" if trace is not None else f"{'pinned':>12s}"
            rows.append(f"{name:40s} {numel:9d} {per_param} {self.samples.get(name, '-')!s:>5s} {bits:4d}")
        return "\n".join(rows)

    def on_fit_end(self, trainer, pl_module) -> None:
        batches = training_batches(trainer, self.hessian_batches)
        self.choose(target_module(pl_module), batches)
        if trainer.is_global_zero:
            rank_zero_info("MixedPrecision: chosen bits per layer\n" + self.table())
            text = json.dumps({"bits": self.bits, "traces": self.traces, "draws": self.samples,
                               "budget": self.budget}, indent=1)
            write_atomic(output_dir(trainer, self.output) / "mixed_precision.json", lambda tmp: tmp.write_text(text))
