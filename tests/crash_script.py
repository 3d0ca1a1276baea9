"""Callbacks the reliability tests inject into a real ``visionlab fit`` process (``--trainer.callbacks+=``)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process (no cleanup, no exception hooks) once ``trainer.global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class ReportSteps(pl.Callback):
    """Print the global step a fit starts and ends at, on rank 0."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"visionlab-test: start global_step={trainer.global_step} epoch={trainer.current_epoch}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"visionlab-test: end global_step={trainer.global_step}", flush=True)
