"""Loaded by tests/test_slurm.py into the SLURM job: SLURM's pre-timeout signal, sent at a known step.

Rank 0 asks slurmctld (``scancel --signal``, the same delivery path as ``#SBATCH --signal``) to signal every task
of the job after optimizer step ``step`` of the job's first run, and waits until its own process has received
the signal, so the pre-emption happens at that step however long the delivery takes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl

from callbacks.slurm import SLURMRequeue


class SignalAtStep(pl.Callback):
    """``request_file``: inside a container (no ``scancel``), rank 0 writes this file instead and the test, outside,
    runs the ``scancel --signal`` (tests/test_slurm.py)."""

    def __init__(self, step: int, signal_name: str, timeout: float = 60.0, request_file: str | None = None):
        self.step, self.signal_name, self.timeout, self.request_file = step, signal_name, timeout, request_file

    def on_train_batch_end(self, trainer, *args) -> None:
        first_run = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        if not (first_run and trainer.is_global_zero and trainer.global_step == self.step):
            return
        requeue = next(cb for cb in trainer.callbacks if isinstance(cb, SLURMRequeue))
        deadline, failures = time.monotonic() + self.timeout, []
        if self.request_file and shutil.which("scancel") is None:
            Path(self.request_file).write_text(self.signal_name)
            while not requeue.signalled and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs between these sleeps
        else:
            while not requeue.signalled and time.monotonic() < deadline:
                # slurmctld on a loaded 2-core machine can time out a request (scancel exits 1): ask again, as a user
                # would, rather than fail the job in a callback that only stands in for SLURM's own timer
                done = subprocess.run(["scancel", f"--signal={self.signal_name}", os.environ["SLURM_JOB_ID"]],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    failures.append(done.stderr.strip() or str(done.returncode))
                    time.sleep(1.0)
                    continue
                wait_until = min(deadline, time.monotonic() + 20)
                while not requeue.signalled and time.monotonic() < wait_until:
                    time.sleep(0.01)  # the handler runs between these sleeps
        assert requeue.signalled, f"SIG{self.signal_name} did not arrive within {self.timeout} s; scancel: {failures}"
