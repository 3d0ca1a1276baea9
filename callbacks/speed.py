"""Training-speed switches as technique-independent callbacks, plus a throughput meter.

Each acts on ``pl_module.<attribute>`` (default ``backbone``, the network every technique trains), never on
the LightningModule itself, so checkpoints keep their keys and any technique can use them from YAML:
``configs/callbacks/{channels_last,compile,grad_checkpointing,throughput}.yaml``.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from modules.components.batches import named_batch
from modules.components.errors import ConfigError


def _network(pl_module: pl.LightningModule, attribute: str) -> nn.Module:
    """``pl_module``'s submodule at the dotted path ``attribute`` (``backbone``, ``model.image_encoder``)."""
    try:
        return pl_module.get_submodule(attribute)
    except AttributeError:
        raise ConfigError(f"{type(pl_module).__name__} has no network '{attribute}': set the callback's attribute "
                          "to the (dotted) submodule to act on, e.g. backbone, denoiser, model.image_encoder") from None


class ChannelsLast(pl.Callback):
    """Convert the network's 4-D weights to ``channels_last`` (NHWC) at setup.

    Convolutions with channels-last weights produce channels-last outputs from ordinary NCHW inputs, so the
    batch needs no conversion; on GPUs with tensor cores (and oneDNN on CPU) NHWC avoids layout transposes.
    """

    def __init__(self, attribute: str = "backbone"):
        self.attribute = attribute

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _network(pl_module, self.attribute).to(memory_format=torch.channels_last)


class CompileNetwork(pl.Callback):
    """``torch.compile`` the network (``nn.Module.compile``: in place, state-dict keys unchanged) at setup.

    The first steps pay the compilation (tens of seconds for a ResNet on CPU, minutes for a ViT-L on GPU):
    judge throughput after the warm-up. Compiling the network rather than the LightningModule keeps the
    training step, logging and callbacks in eager mode.

    Masked image modeling (SimMIM, MAE, MR-MAE) and CLIP with token dropping run a ViT's steps one by one
    (``modules/components/masked_vit.py``) instead of calling the ViT itself: compiling the whole network
    would leave their path eager, so the first training step checks that the compiled module was called and
    stops with an error that says to set ``blocks: true``. With ``blocks`` each block of ``<network>.blocks``
    is compiled (PyTorch's regional compilation: the blocks share one compiled graph, so it also compiles
    faster than the whole network).

    Args:
        attribute: the (dotted) submodule to compile, e.g. ``backbone`` or ``model.image_encoder`` (CLIP).
        mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``).
        backend: ``inductor`` (default) or another registered backend (``eager`` checks capture only).
        dynamic: let shapes vary without recompiling (e.g. a smaller last batch).
        blocks: compile every block of ``<network>.blocks`` (timm ViTs) instead of the network.
    """

    def __init__(self, attribute: str = "backbone", mode: str = "default", backend: str = "inductor",
                 dynamic: bool | None = None, blocks: bool = False):
        self.attribute, self.mode, self.backend, self.dynamic, self.blocks = attribute, mode, backend, dynamic, blocks
        self._calls, self._hook = 0, None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = _network(pl_module, self.attribute)
        compiled = [network]
        if self.blocks:
            blocks = getattr(network, "blocks", None)
            compiled = list(blocks.children()) if isinstance(blocks, nn.Module) else []
            if not compiled:
                raise ConfigError(f"CompileNetwork(blocks=true): {type(network).__name__} ('{self.attribute}') has no "
                                  "'blocks' to compile (a timm ViT has): set blocks: false to compile the whole network")
        for module in compiled:
            module.compile(mode=self.mode, backend=self.backend, dynamic=self.dynamic)
        if stage == "fit" and self._hook is None:
            self._calls = 0
            self._hook = compiled[0].register_forward_pre_hook(self._count)

    def _count(self, module, inputs) -> None:
        self._calls += 1

    def on_train_start(self, trainer, pl_module) -> None:
        self._calls = 0  # what the sanity-check validation called does not count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        if self._calls == 0:
            raise ConfigError(f"CompileNetwork compiled '{self.attribute}', but {type(pl_module).__name__}'s training step "
                              "never called it (it runs the network's steps one by one, as masked ViTs do): set "
                              "blocks: true to compile its blocks, or attribute to the submodule the step calls")


class ActivationCheckpointing(pl.Callback):
    """Recompute activations in the backward pass (timm's ``set_grad_checkpointing``): less memory, ~30% more compute."""

    def __init__(self, attribute: str = "backbone"):
        self.attribute = attribute

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = _network(pl_module, self.attribute)
        if not hasattr(network, "set_grad_checkpointing"):
            raise ConfigError(f"{type(network).__name__} has no set_grad_checkpointing(): activation checkpointing "
                              "needs a timm model that supports it (ViT, ConvNeXt, ResNet, ...)")
        network.set_grad_checkpointing(True)


def batch_images(batch) -> int:
    """Images in a (named) batch."""
    return int(named_batch(batch)["image"].shape[0])


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` with visionlab's batches and the backbone's FLOPs measured for you.

    Logs ``train/device/samples_per_sec`` and ``train/samples_per_sec`` (all devices), their batch rates, and, with
    ``measure_flops``, ``train/device/flops_per_sec`` and on a GPU whose peak Lightning knows (A100, H100, ...)
    ``train/device/mfu``; prints the final rates at the end of fit. Rates are over a sliding window of
    ``window_size`` steps, so the first steps (compilation, warm-up) leave the window.

    FLOPs per batch: the module's own ``flops_per_batch`` attribute when it has one, else the forward and backward
    of its ``attribute`` network (``backbone``) on one training batch's shape, counted by Lightning's
    ``measure_flops`` on the meta device (nothing runs). For techniques whose step runs more than that network (MAE's
    decoder, KD teachers, CLIP's text tower) the count is the backbone's share: MFU is then a lower bound.

    Args:
        window_size: steps in the rate window.
        measure_flops: count FLOPs per batch (see above); False logs rates only.
        attribute: the network whose FLOPs are counted.
    """

    def __init__(self, window_size: int = 50, measure_flops: bool = True, attribute: str = "backbone"):
        super().__init__(batch_size_fn=batch_images, window_size=window_size)
        self.measure, self.attribute = measure_flops, attribute

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._flops_counted = not self.measure or hasattr(pl_module, "flops_per_batch")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        if not self._flops_counted:
            self._flops_counted = True
            flops = backbone_flops(_network(pl_module, self.attribute), named_batch(batch)["image"])
            if flops is not None:
                pl_module.flops_per_batch = flops
        if trainer.is_global_zero or trainer.world_size == 1:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rates = {k: float(v) for k, v in trainer.logged_metrics.items() if "samples_per_sec" in k}
        if rates:
            rank_zero_info("visionlab: throughput " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(rates.items())))


def backbone_flops(network: nn.Module, images: torch.Tensor) -> int | None:
    """Forward + backward FLOPs of ``network`` on a batch shaped like ``images``, counted on the meta device."""
    try:
        meta = copy.deepcopy(network).to("meta")
        example = torch.empty(images.shape, device="meta")
        return int(measure_flops(meta, lambda: meta(example), loss_fn=torch.Tensor.sum))
    except Exception as err:  # a network with data-dependent Python control flow cannot run on meta tensors
        rank_zero_info(f"visionlab: FLOPs not counted ({type(err).__name__}: {err}); throughput logs rates only")
        return None
