"""Multi-process runs: when a rank dies, the others stop with one line naming it instead of hanging.

A rank that is killed leaves the others inside a collective. Gloo notices a closed connection at once; a rank
that hangs, or NCCL, is noticed after the process-group timeout (``DDPStrategy(timeout=...)``, see
``configs/trainer/ddp_cpu.yaml``). Either way the error says which *peer address* failed, not which rank. On
that error every surviving rank checks in through the run's own key-value store (the ``TCPStore`` that
rank 0 hosts for ``init_process_group``); the ranks that have not checked in after ``grace_seconds`` are the
lost ones. If the store itself is gone, rank 0 (its host) is the one lost.

Only a failed collective asks who is lost: an error raised by this rank's own code (a callback, the data) is
this rank's, and is reported as it is instead of blaming the peers that wait for it in their next collective.
"""

from __future__ import annotations

from datetime import timedelta

import lightning.pytorch as pl
import torch.distributed as dist

from modules.components.errors import LostRankError, VisionlabError


class LostRankReport(pl.Callback):
    """On an error in a multi-process run, name the lost ranks and raise :class:`LostRankError`.

    Args:
        grace_seconds: how long a survivor waits for the other survivors to check in.
    """

    def __init__(self, grace_seconds: float = 20.0) -> None:
        self.grace_seconds = grace_seconds

    @staticmethod
    def is_collective_failure(exception: BaseException) -> bool:
        """A failed collective or store call: torch's ``DistError`` family (NCCL, the store), or gloo's transport
        errors, which torch raises as a plain ``RuntimeError`` whose text names gloo (torch 2.14: "[.../gloo/
        transport/tcp/pair.cc:545] Read error ... Connection reset by peer", "... Timed out waiting ...")."""
        return isinstance(exception, dist.DistError) or (isinstance(exception, RuntimeError) and "gloo" in str(exception))

    def _lost_ranks(self, trainer: pl.Trainer) -> list[int]:
        rank, world = trainer.global_rank, trainer.world_size
        children = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
        # On the launching process, Lightning's own child processes tell at once (local ranks 1..n-1).
        local = [i + 1 for i, proc in enumerate(children) if proc.poll() is not None and proc.returncode != 0]
        if local:
            first = trainer.node_rank * trainer.num_devices
            return [first + i for i in local]
        environment = trainer.strategy.cluster_environment
        try:
            store = dist.PrefixStore("visionlab/alive", dist.TCPStore(
                environment.main_address, environment.main_port, is_master=False,
                timeout=timedelta(seconds=self.grace_seconds), wait_for_workers=False))
            store.set(str(rank), "1")
            others = [str(r) for r in range(world) if r != rank]
            try:
                store.wait(others, timedelta(seconds=self.grace_seconds))
            except Exception:  # some did not check in: they are the lost ones
                pass
            return [int(r) for r in others if not store.check([r])]
        except Exception:  # the store (hosted by rank 0) cannot be reached
            return [0] if rank != 0 else []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size < 2 or isinstance(exception, VisionlabError) or not self.is_collective_failure(exception):
            return
        lost = self._lost_ranks(trainer)
        if lost:
            names = ", ".join(map(str, lost))
            report = LostRankError(
                f"rank {names} of {trainer.world_size} stopped (killed, crashed or hung) at global step "
                f"{trainer.global_step}; rank {trainer.global_rank} stops too. Look at rank {names}'s log, then "
                f"restart all ranks with --ckpt_path last")
            # Not raised here: the other callbacks, the strategy and the loggers still get on_exception.
            # Chained as the cause, the CLI finds it and prints its one line (app/cli.py _user_error).
            report.__cause__, exception.__cause__ = exception.__cause__, report
