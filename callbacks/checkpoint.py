"""Checkpointing that bounds the work lost on a crash and never leaves a half-written checkpoint.

- :class:`LatestCheckpoint`: Lightning's ModelCheckpoint (top-k by the monitored metric, per epoch) plus a
  ``last.ckpt`` that is rewritten every ``last_train_time_interval`` / ``last_every_n_train_steps`` *inside*
  an epoch and at every save point, so ``fit --ckpt_path last`` resumes mid-epoch at the saved step.
- :class:`AtomicCheckpointIO`: checkpoint files written through ``write_atomic`` (temp file in the same
  folder, then ``os.replace``); a full disk leaves the previous file intact and says how much space is needed.
- :func:`resolve_resume_path`: ``--ckpt_path last`` / ``last-valid`` / a path, checked before the run starts; a
  sharded checkpoint (FSDP, configs/trainer/fsdp.yaml) is a folder of that name, checked through its metadata file.
"""

from __future__ import annotations

import io
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from modules.components.checkpoints import load_checkpoint
from modules.components.errors import ConfigError
from modules.components.files import write_atomic


def at_optimizer_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether training batch ``batch_idx`` ended a gradient-accumulation window (the optimizer stepped after it).

    Lightning saves no accumulated gradients: a checkpoint written inside a window resumes with the window's
    earlier batches lost, so resumable saves wait for its end (at most ``accumulate_grad_batches - 1`` batches).
    """
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 >= trainer.num_training_batches


def fit_stops_here(trainer: pl.Trainer) -> bool:
    """Whether the fit ends after the training batch that just ended: ``max_steps`` reached, or a stop asked for
    (``trainer.should_stop``: SLURM's requeue, a Timer, early stopping) in a hook that ran before this one."""
    return (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps) or trainer.should_stop


def epoch_cut_short(trainer: pl.Trainer) -> bool:
    """Whether the training epoch ending now stopped before its last batch (``max_steps`` or ``should_stop``).

    Lightning 2.6.6's ``FitLoop.on_advance_end`` runs for such an epoch as for a finished one: it counts the epoch
    as processed, then calls ``on_train_epoch_end`` and later ``on_train_end``. A checkpoint saved in those hooks
    says the epoch is over while its batch progress (and ``data.train_position``) says it is not: resumed, the fit
    loop restarts "at the epoch end", finishes that epoch's remaining batches as the *next* epoch and stops a
    ``max_epochs`` early (with ``max_epochs`` 1, it trains nothing). Only a batch-end save holds this stop's state.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return not progress.is_last_batch and progress.current.ready < trainer.num_training_batches


class LatestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` always holds the latest state, also mid-epoch.

    The top-k checkpoints follow ModelCheckpoint's own (epoch) schedule and monitor. ``last.ckpt`` is
    written by this class alone, on its own schedule: every ``last_every_n_train_steps`` optimizer steps
    and/or every ``last_train_time_interval`` of training (rank 0's clock decides, broadcast so that all
    ranks save together), and at every epoch end. ModelCheckpoint's own
    ``every_n_train_steps`` / ``train_time_interval`` cannot do this: they also trigger the top-k save,
    which would then rank checkpoints by a validation metric that is stale mid-epoch.

    Why the base class's ``save_last`` is not used: Lightning 2.6.6 writes ``last.ckpt`` only in a step
    where a top-k file is written (``_last_global_step_saved == trainer.global_step`` in
    ``on_validation_end`` / ``on_train_epoch_end``), so once the monitored metric stops improving
    ``last.ckpt`` goes stale and a resume would silently rewind.

    Args:
        save_last: write ``last.ckpt`` (Lightning's ``fit --ckpt_path last`` picks the newest ``last*.ckpt``).
        last_every_n_train_steps: also write it every this many optimizer steps (0: off).
        last_train_time_interval: also write it when this much training time passed since it was last
            written (``None``: off). In YAML: ``"0:10:00"`` (h:mm:ss).
        **kwargs: ModelCheckpoint's other arguments (monitor, mode, save_top_k, filename, ...).
    """

    def __init__(self, save_last: bool = True, last_every_n_train_steps: int = 0,
                 last_train_time_interval: timedelta | None = None, **kwargs) -> None:
        super().__init__(save_last=False, **kwargs)
        if last_every_n_train_steps < 0:
            raise ConfigError(f"checkpoint.last_every_n_train_steps={last_every_n_train_steps}: must be >= 0")
        self.write_last = bool(save_last)
        self.last_every_n_train_steps = last_every_n_train_steps
        self.last_train_time_interval = last_train_time_interval
        self._last_saved_step: int | None = None
        self._last_saved_time = time.monotonic()

    def _may_write_last(self, trainer: pl.Trainer) -> bool:
        return (self.write_last and not trainer.fast_dev_run and not trainer.sanity_checking
                and trainer.state.fn == "fit" and self._last_saved_step != trainer.global_step)

    def _write_last(self, trainer: pl.Trainer) -> None:
        metrics = {**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
                   "step": torch.tensor(trainer.global_step)}
        path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path  # before saving: it is part of the saved callback state
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_saved_step = trainer.global_step
        self._last_saved_time = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_saved_time = time.monotonic()
        self._last_saved_step = trainer.global_step  # a resumed run does not rewrite the state it resumed from

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.write_last:
            return
        due = bool(self.last_every_n_train_steps) and trainer.global_step % self.last_every_n_train_steps == 0
        if self.last_train_time_interval is not None:
            elapsed = time.monotonic() - self._last_saved_time >= self.last_train_time_interval.total_seconds()
            due = trainer.strategy.broadcast(due or elapsed)
        # The step that ends the fit is saved here, at its batch end, whatever the schedule: a run stopped by
        # max_steps continues from it with a larger max_steps (see epoch_cut_short for why not later).
        due = due or fit_stops_here(trainer)
        if due and self._may_write_last(trainer) and at_optimizer_step(trainer, batch_idx):
            self._write_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning 2.x runs this after the epoch's validation and top-k save, so last.ckpt records both;
        # rewritten even if a timed save hit the epoch's last batch (that one preceded validation).
        super().on_train_epoch_end(trainer, pl_module)
        if epoch_cut_short(trainer):
            return  # last.ckpt keeps the batch-end state: this hook's would say the epoch is over
        self._last_saved_step = None
        if self._may_write_last(trainer):
            self._write_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # A fit stopped mid-epoch was saved at its last batch end; a state saved now would count the cut epoch as
        # processed (epoch_cut_short).
        if self._may_write_last(trainer) and not epoch_cut_short(trainer):
            self._write_last(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file next to the checkpoint, then ``os.replace``; reads via ``load_checkpoint``.

    Lightning 2.6.6's ``_atomic_save`` writes into ``tempfile.mkstemp()`` (the system temp folder) and moves
    the file into place: across file systems that move is a copy, so a full disk or a kill mid-copy leaves a
    truncated ``last.ckpt`` in place of the previous one. Here the previous file stays intact, a full disk
    raises DataError naming the path and the space needed, and reading uses ``weights_only=True`` with the
    project's allow-list; an unreadable file is a one-line ConfigError.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        write_atomic(path, lambda tmp: tmp.write_bytes(data), expected_bytes=len(data))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path, "--ckpt_path")


SHARDED_METADATA = "meta.pt"  # Lightning's _METADATA_FILENAME: the non-tensor state of a sharded checkpoint


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder as ModelParallelStrategy writes it (one ``.distcp`` per rank,
    torch's ``.metadata`` index, and Lightning's ``meta.pt`` holding everything but the weights and optimizer)."""
    return path.is_dir() and (path / SHARDED_METADATA).is_file() and (path / ".metadata").is_file()


def _readable(path: Path) -> bool:
    try:
        load_checkpoint(path / SHARDED_METADATA if is_sharded(path) else path)
    except ConfigError:
        return False
    return True


def newest_readable(folder: Path, skip: Path | None = None) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` (``skip`` excluded) that loads as a checkpoint."""
    candidates = sorted((p for p in Path(folder).glob("*.ckpt") if p != skip and (p.is_file() or is_sharded(p))),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if _readable(p)), None)


def resolve_resume_path(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """Check ``--ckpt_path`` before a run starts; ``last-valid`` picks the newest readable checkpoint.

    ``last`` is left to Lightning (it picks the newest ``last*.ckpt``) once that file reads; an unreadable
    one raises ConfigError naming it and the newest readable checkpoint in the same folder. A sharded checkpoint
    folder counts as readable when its ``meta.pt`` loads (the shards themselves are read by every rank later).
    """
    if ckpt_path is None or ckpt_path in {"best", "hpc"} or "://" in str(ckpt_path):
        return ckpt_path
    checkpoint_dir = Path(checkpoint_dir)
    if ckpt_path == "last-valid":
        found = newest_readable(checkpoint_dir)
        if found is None:
            raise ConfigError(f"--ckpt_path last-valid: no readable checkpoint in {checkpoint_dir}")
        return str(found)
    if ckpt_path == "last":
        lasts = sorted(checkpoint_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not lasts:
            return ckpt_path  # Lightning warns and starts from scratch: "set and forget" before the first run
        path = lasts[-1]
    else:
        path = Path(ckpt_path)
        if not (path.is_file() or path.is_dir()):
            raise ConfigError(f"--ckpt_path {path} does not exist: pass a .ckpt written by visionlab fit, "
                              f"'last' or 'last-valid'")
    if _readable(path):
        return ckpt_path
    older = newest_readable(path.parent, skip=path)
    hint = (f"the newest readable checkpoint there is {older}: pass --ckpt_path {older} or --ckpt_path last-valid"
            if older else "no other checkpoint in that folder is readable")
    raise ConfigError(f"--ckpt_path {ckpt_path}: {path} is truncated or not a checkpoint; {hint}")
