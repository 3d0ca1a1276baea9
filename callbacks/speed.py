"""Training-speed switches as technique-independent callbacks, plus a throughput meter.

Each acts on ``pl_module.<attribute>`` (default ``backbone``, the network every technique trains), never on
the LightningModule itself, so checkpoints keep their keys and any technique can use them from YAML:
``configs/callbacks/{channels_last,compile,grad_checkpointing,throughput}.yaml``.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
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


class Throughput(pl.Callback):
    """Training images/s per device and in total, logged every ``log_every_n_steps`` and printed at the end.

    Time is the sum of the training steps (batch fetch excluded, as is validation), measured on rank 0 after
    synchronising the accelerator; the total multiplies by the world size (every rank has the same batch).
    """

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self.images = 0
        self.seconds = 0.0
        self._seen = 0
        self._start = 0.0

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        self._seen += 1
        if self._seen <= self.warmup_steps:  # compilation, allocator and data-pipeline warm-up
            return
        self.images += batch_images(batch)
        self.seconds += time.perf_counter() - self._start
        if self.seconds > 0:
            per_device = self.images / self.seconds
            pl_module.log("train/images_per_sec", per_device, rank_zero_only=True)
            pl_module.log("train/images_per_sec_total", per_device * trainer.world_size, rank_zero_only=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.seconds > 0:
            per_device = self.images / self.seconds
            rank_zero_info(f"visionlab: throughput {per_device:.1f} images/s per device, "
                           f"{per_device * trainer.world_size:.1f} in total ({trainer.world_size} devices, "
                           f"{self.images} images after {self.warmup_steps} warm-up steps)")
