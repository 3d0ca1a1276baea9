"""ModelCheckpoint whose ``last.ckpt`` always holds the latest state."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class LatestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: ``last.ckpt`` is rewritten at every save point.

    Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint is written in the same step, so after
    the monitored metric stops improving ``last.ckpt`` goes stale and ``fit --ckpt_path last`` (or a
    requeued job) would silently rewind. Here the last checkpoint is written whenever the base class did
    not write one at this step.
    """

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)
