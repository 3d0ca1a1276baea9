"""Weight averaging along the training trajectory: EMA and SWA (Averaging Weights Leads to Wider Optima).

Both subclass Lightning's own callbacks. EMA's average is swapped in for validation and written to checkpoints
(``state_dict`` holds the average, ``current_model_state`` the raw weights); SWA's lives in the callback's state
until training ends. Both are restored on resume. They act on the whole ``pl_module`` and need nothing from the
technique, except that evaluating both weight sets (``val/...`` and ``val_raw/...`` for EMA, ``val/...`` and
``val_avg/...`` for SWA) needs an evaluation step that logs under ``pl_module.eval_prefix`` (modules/base.py).
"""

from __future__ import annotations

import inspect
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

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


def swap_weights(first: nn.Module, second: nn.Module, buffers: bool = True) -> None:
    """Exchange the values of two same-architecture modules' parameters (and buffers) in place."""
    if buffers:
        pairs = zip(chain(first.parameters(), first.buffers()), chain(second.parameters(), second.buffers()))
    else:
        pairs = zip(first.parameters(), second.parameters())
    for one, other in pairs:
        kept = one.detach().clone()
        one.detach().copy_(other.detach())
        other.detach().copy_(kept)


class _OtherWeightsEvaluation:
    """Evaluates a second weight set on the same evaluation batches, logged under ``val_<tag>/...``.

    After the module's own step on a validation/test batch, the other weights are swapped in, the step runs
    again under the trainer's precision context with ``pl_module.eval_weights = tag`` (a technique that logs under
    ``pl_module.eval_prefix`` then writes ``val_<tag>/acc1`` beside ``val/acc1``), and the weights are swapped
    straight back, so training, checkpoints and resume see nothing of it. Techniques whose evaluation step takes
    no ``dataloader_idx`` (they log fixed ``val/`` keys) are skipped with a warning, as their logs would mix.
    Sanity-check batches are not repeated. A holder on another device (``device: cpu``) is copied per batch.
    """

    tag = "raw"
    swap_buffers = True
    evaluate_other = True

    def other_weights(self, trainer, pl_module) -> nn.Module | None:
        """The module holding the other weight set now (same architecture as ``pl_module``), or ``None``."""
        raise NotImplementedError

    def _evaluate_other(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        holder = self.other_weights(trainer, pl_module) if self.evaluate_other and not trainer.sanity_checking else None
        if holder is None:
            return
        step = pl_module.test_step if trainer.testing else pl_module.validation_step
        if "dataloader_idx" not in inspect.signature(step).parameters or not hasattr(pl_module, "eval_weights"):
            if not getattr(self, "_warned", False):
                rank_zero_warn(f"{type(self).__name__}: {type(pl_module).__name__} logs fixed val/ keys, so its "
                               f"{self.tag} weights are not evaluated (val_{self.tag}/...)")
                self._warned = True
            return
        context = trainer.precision_plugin.test_step_context if trainer.testing else trainer.precision_plugin.val_step_context
        swap_weights(pl_module, holder, self.swap_buffers)
        pl_module.eval_weights = self.tag
        try:
            with context():
                step(batch, batch_idx, dataloader_idx=dataloader_idx)
        finally:
            pl_module.eval_weights = ""
            swap_weights(pl_module, holder, self.swap_buffers)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._evaluate_other(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._evaluate_other(trainer, pl_module, batch, batch_idx, dataloader_idx)


class EMA(_OtherWeightsEvaluation, WeightAveraging):
    """Exponential moving average of the weights (and buffers), used for validation and saved in checkpoints.

    The decay of the update after ``n`` earlier updates is ``min(decay, 1 - (1 + n) ** -(2/3))`` with
    ``warmup`` (timm ``ModelEmaV3``'s warm-up, the rule CLIP and diffusion use; 0.66 at n = 4, 0.999 only
    after ~31.6k updates), else ``decay``; the first update copies the weights.

    ``val/...`` is the average (what ``val/acc1`` checkpoint selection and the saved ``state_dict`` hold) and,
    with ``evaluate_raw``, ``val_raw/...`` the raw weights on the same batches: during fit, and in
    ``validate``/``test`` of an EMA checkpoint (its ``current_model_state``).

    Args:
        decay: EMA decay per update (``ema_decay``); 0 makes the average equal the model.
        warmup: ramp the decay up with timm ``ModelEmaV3``'s rule (above).
        warmup_power: exponent of that ramp (timm's default 2/3; 3/4 reaches the decay sooner).
        update_every_n_steps: update after every n-th optimizer step.
        update_starting_at_step: first optimizer step (0-based) that updates the average.
        device: where the averaged copy lives (``cpu`` saves accelerator memory); default: the model's device.
        use_buffers: average buffers too (BatchNorm statistics); otherwise they are copied.
        evaluate_raw: also evaluate the raw weights (``val_raw/...``); doubles the evaluation compute.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False, warmup_power: float = 2 / 3,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 device: str | None = None, use_buffers: bool = True, evaluate_raw: bool = True):
        # Lightning's WeightAveraging with our avg_fn (its EMAWeightAveraging fixes avg_fn to a constant decay)
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=ema_avg_fn(decay, warmup, warmup_power))
        self.decay, self.warmup, self.warmup_power = decay, warmup, warmup_power
        self.update_every_n_steps, self.update_starting_at_step = update_every_n_steps, update_starting_at_step
        self.evaluate_other = evaluate_raw
        self._raw_copy: nn.Module | None = None

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

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._raw_copy = None
        if trainer.state.fn != "fit" and self.evaluate_other and "current_model_state" in checkpoint:
            # validate/test: the module holds the average (state_dict); the raw weights ride in the checkpoint
            self._raw_copy = deepcopy(pl_module)
            self._raw_copy.load_state_dict(checkpoint["current_model_state"])

    def other_weights(self, trainer, pl_module) -> nn.Module | None:
        if trainer.state.fn == "fit":  # Lightning swapped the average in: the raw weights wait in its copy
            return None if self._average_model is None else self._average_model.module
        if self._raw_copy is not None and self._raw_copy.device != pl_module.device:
            self._raw_copy.to(pl_module.device)
        return self._raw_copy


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


class SWA(_OtherWeightsEvaluation, StochasticWeightAveraging):
    """Lightning's StochasticWeightAveraging, made to work with visionlab's timm step schedulers.

    From ``swa_epoch_start`` on, the lr follows SWALR towards ``swa_lrs`` and the weights at the start of
    each epoch are averaged with equal weight; BatchNorm statistics are recomputed in one extra epoch.
    Arguments are Lightning's (``swa_lrs``, ``swa_epoch_start``, ``annealing_epochs``, ``annealing_strategy``,
    ``device``).

    As in Lightning, ``val/...`` and the checkpoints' ``state_dict`` are the trained (raw) weights until training
    ends, then the average. With ``evaluate_average``, once averaging has begun each evaluation batch is also
    run with the running average's parameters, logged as ``val_avg/...``. SWA averages parameters only, so that
    evaluation uses the raw model's BatchNorm statistics (exact for BatchNorm-free networks such as ViTs; the
    paper's recomputed statistics exist only after the final extra epoch).

    Args:
        evaluate_average: also evaluate the running average (``val_avg/...``) during the SWA epochs.
    """

    tag, swap_buffers = "avg", False

    def __init__(self, *args, evaluate_average: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluate_other = evaluate_average

    def other_weights(self, trainer, pl_module) -> nn.Module | None:
        averaged = self.n_averaged is not None and int(self.n_averaged) > 0
        if trainer.state.fn != "fit" or not averaged or trainer.current_epoch > self.swa_end:
            return None  # not averaging yet, or the module holds the average already (BatchNorm epoch, end)
        return self._average_model

    def setup(self, trainer, pl_module, stage: str) -> None:
        refuse_sharded(trainer, "SWA")
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        configs = trainer.lr_scheduler_configs  # Lightning put its SWALR (interval "epoch") in the first slot
        if configs and not hasattr(configs[0].scheduler, "step_update"):
            configs[0].scheduler = _StepUpdate(configs[0].scheduler)
