"""Weight averaging along the training trajectory: EMA and SWA (Averaging Weights Leads to Wider Optima).

Both subclass Lightning's own callbacks, so the averaged weights are swapped in for validation, written to
checkpoints (``state_dict`` holds the average, ``current_model_state`` the raw weights) and restored on resume.
They act on the whole ``pl_module`` and need nothing from the technique.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging

from modules.components.errors import ConfigError


def ema_decay(decay: float, updates: int, warmup: bool, warmup_power: float = 2 / 3) -> float:
    """Decay of the EMA update that follows ``updates`` earlier ones (timm ``ModelEmaV3``'s rule).

    With warm-up: ``min(decay, 1 - (1 + updates) ** -warmup_power)``, i.e. ``ModelEmaV3(use_warmup=True,
    warmup_gamma=1).get_decay(updates + 1)`` (CLIP and diffusion call it with the 1-based step count);
    the first update copies the weights in both. Without warm-up: ``decay``.
    """
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + updates) ** -warmup_power)


def ema_avg_fn(decay: float, warmup: bool, warmup_power: float = 2 / 3):
    """``AveragedModel`` ``avg_fn``: ``d * avg + (1 - d) * current`` with ``d = ema_decay(...)``.

    Integer tensors (BatchNorm ``num_batches_tracked``) take the current value.
    """
    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        return averaged.lerp(current.to(averaged.dtype), 1.0 - ema_decay(decay, int(num_averaged), warmup, warmup_power))
    return update


def refuse_sharded(trainer, callback: str) -> None:
    """Averaging copies the LightningModule's parameters; under FSDP each rank holds only its shards, so the
    copy would average shards as if they were whole tensors. Refuse with one line instead."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise ConfigError(f"{callback} does not support sharded training ({type(trainer.strategy).__name__}): it would "
                          "average parameter shards; use DDP (configs/trainer/ddp.yaml) with EMA/SWA, or drop the callback")


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and buffers), used for validation and saved in checkpoints.

    The decay of the update after ``n`` earlier updates is ``min(decay, 1 - (1 + n) ** -(2/3))`` with
    ``warmup`` (timm ``ModelEmaV3``'s warm-up, the rule CLIP and diffusion use; 0.66 at n = 4, 0.999 only
    after ~31.6k updates), else ``decay``; the first update copies the weights.

    Args:
        decay: EMA decay per update (``ema_decay``); 0 makes the average equal the model.
        warmup: ramp the decay up with timm ``ModelEmaV3``'s rule (above).
        warmup_power: exponent of that ramp (timm's default 2/3; 3/4 reaches the decay sooner).
        update_every_n_steps: update after every n-th optimizer step.
        update_starting_at_step: first optimizer step (0-based) that updates the average.
        device: where the averaged copy lives (``cpu`` saves accelerator memory); default: the model's device.
        use_buffers: average buffers too (BatchNorm statistics); otherwise they are copied.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False, warmup_power: float = 2 / 3,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 device: str | None = None, use_buffers: bool = True):
        # Lightning's WeightAveraging with our avg_fn (its EMAWeightAveraging fixes avg_fn to a constant decay)
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=ema_avg_fn(decay, warmup, warmup_power))
        self.decay, self.warmup, self.warmup_power = decay, warmup, warmup_power
        self.update_every_n_steps, self.update_starting_at_step = update_every_n_steps, update_starting_at_step

    def setup(self, trainer, pl_module, stage: str) -> None:
        refuse_sharded(trainer, "EMA")
        super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After every ``update_every_n_steps``-th optimizer step from ``update_starting_at_step`` on."""
        if step_idx is None:
            return False
        started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
        return started and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0

    @property
    def average_model(self) -> torch.nn.Module | None:
        """The averaged copy of the LightningModule (None before fit)."""
        return None if self._average_model is None else self._average_model.module


class _StepUpdate:
    """Gives a torch LR scheduler timm's ``step_update`` (``VisionModule.lr_scheduler_step`` calls it).

    Everything else (``step``, ``state_dict``, ``optimizer``...) is the wrapped scheduler's, so Lightning's
    SWA callback keeps stepping, saving and restoring the very scheduler it made.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def step_update(self, num_updates: int, metric: Any = None) -> None:
        self.scheduler.step()

    def __getattr__(self, name: str):
        if name == "scheduler":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)


class SWA(StochasticWeightAveraging):
    """Lightning's StochasticWeightAveraging, made to work with visionlab's timm step schedulers.

    From ``swa_epoch_start`` on, the lr follows SWALR towards ``swa_lrs`` and the weights at the start of
    each epoch are averaged with equal weight; BatchNorm statistics are recomputed in one extra epoch.
    Arguments are Lightning's (``swa_lrs``, ``swa_epoch_start``, ``annealing_epochs``, ``annealing_strategy``).
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        refuse_sharded(trainer, "SWA")
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        configs = trainer.lr_scheduler_configs  # Lightning put its SWALR (interval "epoch") in the first slot
        if configs and not hasattr(configs[0].scheduler, "step_update"):
            configs[0].scheduler = _StepUpdate(configs[0].scheduler)
