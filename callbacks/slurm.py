"""SLURM preemption: checkpoint at a point all ranks agree on, then requeue; Lightning resumes from it.

Lightning's own SIGUSR1 handler saves the checkpoint *inside the signal handler*, which runs a collective
(barrier) while other ranks may be blocked in a different one (e.g. DDP's gradient all-reduce), and
hangs multi-process CPU/gloo jobs. This callback keeps Lightning's pieces (``SLURMEnvironment``, the
``hpc_ckpt_<n>.ckpt`` naming and the automatic restore from it on restart) but only *records* the signal
in the handler; after the next training batch every rank agrees on it, saves the checkpoint together and
rank 0 runs ``scontrol requeue``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class SLURMRequeue(pl.Callback):
    """Save ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir`` and requeue when SLURM signals pre-timeout.

    Active only when the trainer runs under ``SLURMEnvironment`` with ``auto_requeue`` (the default for a
    ``srun`` launch); the CLI adds it automatically for SLURM jobs.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._active = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        self._active = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if self._active:
            # Lightning registered its handler just before the loop started; replace it with a flag.
            signal.signal(environment.requeue_signal or signal.SIGUSR1, self._record)

    def _record(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # all ranks call it together: no mismatched collectives
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            log.warning("visionlab: pre-emption signal: saved %s, requeueing SLURM job %s", path, job)
            print(f"visionlab: saved {path}; requeueing SLURM job {job}", flush=True)
            subprocess.run(["scontrol", "requeue", job], check=False)
        self.signalled = False
        trainer.should_stop = True
