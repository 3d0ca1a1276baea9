"""Callbacks the reliability tests inject into a real ``visionlab fit`` process (``--trainer.callbacks+=``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process (no cleanup, no exception hooks) once ``trainer.global_step`` reaches ``step``.

    With ``rank`` set, only that global rank is killed; the others run on into their next collective.
    """

    def __init__(self, step: int, rank: int | None = None, stamp: str | None = None) -> None:
        self.step, self.rank, self.stamp = step, rank, stamp

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and self.rank in (None, trainer.global_rank):
            if self.stamp:  # when it was killed, for the survivors' time to exit
                Path(self.stamp).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


class ReportSteps(pl.Callback):
    """Print the global step a fit starts and ends at, on rank 0."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"visionlab-test: start global_step={trainer.global_step} epoch={trainer.current_epoch}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"visionlab-test: end global_step={trainer.global_step}", flush=True)


def main() -> None:
    """``python tests/crash_script.py KILL_RANK GRACE OUT``: a 2-process CPU DDP fit (gloo) whose rank KILL_RANK
    is SIGKILLed at step 2; the survivor prints one line naming the lost rank and writes OUT/rank<r>.exit."""
    import sys
    from datetime import timedelta

    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.strategies import DDPStrategy

    from app.cli import _user_error
    from callbacks.lost_rank import LostRankReport

    kill_rank, grace, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=300))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=50, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[KillAtStep(2, kill_rank, str(out / "killed")), LostRankReport(grace_seconds=grace)])
    try:
        trainer.fit(BoringModel())
    except Exception as err:
        error = _user_error(err)
        (out / f"rank{trainer.global_rank}.exit").write_text(f"{time.time()!r} {type(error).__name__}")
        if error is None:
            raise
        print(f"visionlab: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
