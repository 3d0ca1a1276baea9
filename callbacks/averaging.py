"""Weight averaging along the training trajectory: EMA and SWA (Averaging Weights Leads to Wider Optima).

Both subclass Lightning's own callbacks, so the averaged weights are swapped in for validation, written to
checkpoints (``state_dict`` holds the average, ``current_model_state`` the raw weights) and restored on resume.
They act on the whole ``pl_module`` and need nothing from the technique.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging
from torch.optim.swa_utils import SWALR


def ema_avg_fn(decay: float, warmup: bool):
    """EMA update ``decay * avg + (1 - decay) * current``; with ``warmup`` the decay ramps as in timm's ModelEmaV3."""
    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged))) if warmup else decay
        return averaged * d + current * (1 - d)
    return update


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights (and buffers), used for validation and saved in checkpoints.

    Args:
        decay: EMA decay per update (``ema_decay``); 0 makes the average equal the model.
        warmup: ramp the decay up as ``min(decay, (1 + n) / (10 + n))`` over the first updates (timm ModelEmaV3).
        update_every_n_steps: update after every n-th optimizer step.
        update_starting_at_step: first optimizer step (0-based) that updates the average.
        device: where the averaged copy lives (``cpu`` saves accelerator memory); default: the model's device.
        use_buffers: average buffers too (BatchNorm statistics); otherwise they are copied.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None, device: str | None = None, use_buffers: bool = True):
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step)
        self._kwargs["avg_fn"] = ema_avg_fn(decay, warmup)
        self.decay, self.warmup = decay, warmup

    @property
    def average_model(self) -> torch.nn.Module | None:
        """The averaged copy of the LightningModule (None before fit)."""
        return None if self._average_model is None else self._average_model.module


class _StepUpdateSWALR(SWALR):
    """SWALR that also answers timm's ``step_update`` (VisionModule.lr_scheduler_step calls it every interval)."""

    def step_update(self, num_updates: int, metric: Any = None) -> None:
        self.step()


class SWA(StochasticWeightAveraging):
    """Lightning's StochasticWeightAveraging, made to work with visionlab's timm step schedulers.

    From ``swa_epoch_start`` on, the lr follows SWALR towards ``swa_lrs`` and the weights at the start of
    each epoch are averaged with equal weight; BatchNorm statistics are recomputed in one extra epoch.
    Arguments are Lightning's (``swa_lrs``, ``swa_epoch_start``, ``annealing_epochs``, ``annealing_strategy``).
    """

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if type(self._swa_scheduler) is SWALR:
            self._swa_scheduler.__class__ = _StepUpdateSWALR
