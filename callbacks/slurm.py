"""SLURM preemption: checkpoint at a point all ranks agree on, then requeue; Lightning resumes from it.

Lightning's own SIGUSR1 handler saves the checkpoint *inside the signal handler*, which runs a collective
(barrier) while other ranks may be blocked in a different one (e.g. DDP's gradient all-reduce), and
hangs multi-process CPU/gloo jobs. This callback keeps Lightning's pieces (``SLURMEnvironment``, the
``hpc_ckpt_<n>.ckpt`` naming and the automatic restore from the highest one on restart) but only *records*
the signal in the handler; after the next training batch every rank agrees on it, saves the checkpoint
together and rank 0 runs ``scontrol requeue``.

Which signal: ``slurm/visionlab.sbatch`` states it once, in its ``#SBATCH --signal`` line, and exports it to
the job as ``VISIONLAB_REQUEUE_SIGNAL``; without the template it is the ``requeue_signal`` of the
``SLURMEnvironment`` in ``trainer.plugins`` (YAML), SIGUSR1 by default. The requeued run logs on in the same
run of every logger (``pin_logger_version``: TensorBoard/CSV version folder, W&B run id, MLflow run), so its step
axis continues.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from callbacks.checkpoint import at_optimizer_step
from modules.components.errors import ConfigError

SIGNAL_VARIABLE = "VISIONLAB_REQUEUE_SIGNAL"  # set by slurm/visionlab.sbatch from its #SBATCH --signal line
# A pre-empted run that cannot requeue itself (no scontrol: inside a container) saved its checkpoint and exits with
# this code on every rank; slurm/visionlab.sbatch, outside the container, then requeues the job. 75 is sysexits.h's
# EX_TEMPFAIL, "a temporary failure: the user is invited to retry".
REQUEUE_EXIT_CODE = 75
JOB_TAG = "slurm_job_id"  # the MLflow tag that finds a requeued job's run (pin_logger_version)


def parse_signal(name: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or ``10`` (sbatch's ``--signal`` spellings) as a signal; ConfigError otherwise."""
    text = name.strip().upper()
    try:
        return signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(f"{SIGNAL_VARIABLE}={name!r} is not a signal: use a name such as USR1 or SIGUSR2, "
                          "as in the sbatch template's #SBATCH --signal line") from None


def template_signal() -> signal.Signals | None:
    """The signal the sbatch template asked SLURM for, or None outside the template."""
    name = os.environ.get(SIGNAL_VARIABLE)
    return parse_signal(name) if name else None


def slurm_job() -> str:
    """``<array job>_<task>`` for an array task, else the job id: what ``scontrol requeue`` takes."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


def next_hpc_checkpoint(folder: str | Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt`` after the highest ``hpc_ckpt_<n>`` in ``folder``: the name Lightning's restart
    looks for (it resumes from the highest ``n`` in ``trainer.default_root_dir`` when no ckpt_path is given)."""
    folder = Path(folder)
    numbers = [int(m.group(1)) for p in folder.glob("hpc_ckpt_*") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def pin_logger_version(config) -> None:
    """Under SLURM, every configured logger continues one run per job id across requeues.

    A requeued job keeps its job id, so a run named after it is the first run's, and Lightning logs at the
    restored global step: the restarted run's steps continue the first run's axis instead of starting a new run.

    - TensorBoard/CSV without a ``version``: ``version=<job id>``, as Lightning's own default logger does
      (``TensorBoardLogger(version=SLURMEnvironment.job_id())``); the requeued run writes to the same folder.
    - W&B without an ``id`` (or ``version``): ``id="slurm-<job id>"`` and ``resume="allow"``; W&B resumes the run of
      that id, or creates it the first time. Offline (``WANDB_MODE=offline``), each process writes its own
      ``offline-run-<time>-slurm-<job id>`` folder under one run id, and ``wandb sync`` appends them to that run.
    - MLflow without a ``run_id``: the store creates run ids, so none can be derived. The run is tagged
      ``slurm_job_id=<job id>`` and a requeued job passes ``run_id`` of the active run in the experiment that carries
      its tag (the earliest, if several). Why a tag rather than a file in ``trainer.default_root_dir``: the store is
      the one record of which run exists (a file can point to a run that was deleted, or be missing when the folder
      moves), the same query works for a file store and a tracking server, and nothing has to be written after
      the run is created (the tag goes in through ``tags``, which Lightning sets at creation).

    A job id reused later (another cluster logging to the same W&B project or MLflow experiment) would join the
    older run, as TensorBoard's ``version_<job id>`` folder would: give such runs their own project/experiment.
    ``config`` is the subcommand's parsed namespace, before instantiation.
    """
    job = SLURMEnvironment.job_id() if SLURMEnvironment.detect() else None
    trainer = config.get("trainer") if config is not None else None
    if job is None or trainer is None:
        return
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = getattr(logger, "class_path", None) if logger is not None else None
        if not isinstance(class_path, str) or logger.get("init_args") is None:
            continue
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
        if not isinstance(cls, type):
            continue
        args = logger.init_args
        if issubclass(cls, (TensorBoardLogger, CSVLogger)) and args.get("version") is None:
            args.version = job
        elif issubclass(cls, WandbLogger) and args.get("id") is None and args.get("version") is None:
            args.id = f"slurm-{job}"
            args.resume = "allow"  # one of wandb.init's keyword arguments, which WandbLogger passes on
        elif issubclass(cls, MLFlowLogger) and args.get("run_id") is None:
            args.tags = {**(args.get("tags") or {}), JOB_TAG: job}
            args.run_id = mlflow_job_run(args, job)


def mlflow_job_run(args, job: str) -> str | None:
    """The id of the earliest active run tagged ``slurm_job_id=<job>`` in the experiment an ``MLFlowLogger`` with
    these init args logs to, or None (first run of the job: the logger creates it, tagged)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    # Where MLFlowLogger logs: its tracking_uri (default: $MLFLOW_TRACKING_URI), else file:<save_dir>.
    uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"file:{args.get('save_dir') or './mlruns'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.get("experiment_name") or "lightning_logs")
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.{JOB_TAG} = '{job}'",
                              run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


class SLURMRequeue(pl.Callback):
    """Save ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir`` and requeue when SLURM signals pre-timeout.

    Active when the run is a SLURM job whose ``SLURMEnvironment`` has ``auto_requeue`` (the default for a
    ``srun`` launch); the CLI adds it automatically for SLURM jobs. Where ``scontrol`` is not on PATH (a
    container), the checkpoint is still saved and the run stops with one line saying to requeue from outside.

    Args:
        requeue_signal: the signal to act on; default: the template's (``VISIONLAB_REQUEUE_SIGNAL``), else the
            ``SLURMEnvironment``'s ``requeue_signal`` (SIGUSR1 unless ``trainer.plugins`` sets another).
    """

    def __init__(self, requeue_signal: str | None = None) -> None:
        self.requeue_signal = parse_signal(requeue_signal) if requeue_signal else None
        self.signalled = False
        self.saved: Path | None = None  # the checkpoint of a pre-emption, until the requeue at on_train_end
        self.requeue_from_outside = False  # pre-empted without scontrol: the CLI exits with REQUEUE_EXIT_CODE
        self._active = False

    def _environment(self, trainer: pl.Trainer) -> SLURMEnvironment | None:
        environment = getattr(trainer.strategy, "cluster_environment", None)  # multi-process strategies
        if isinstance(environment, SLURMEnvironment):
            return environment
        # A single-process strategy keeps no cluster environment: Lightning's defaults for a SLURM job.
        return SLURMEnvironment() if environment is None and SLURMEnvironment.detect() else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        environment = self._environment(trainer)
        self._active = environment is not None and environment.auto_requeue
        if not self._active:
            return
        chosen = self.requeue_signal or template_signal() or environment.requeue_signal or signal.SIGUSR1
        # Lightning registered its in-handler checkpoint on the environment's signal just before the loop
        # started: both that one and the chosen one now only set a flag.
        for signum in {chosen, environment.requeue_signal or signal.SIGUSR1}:
            signal.signal(signum, self._record)
        self.requeue_signal = chosen

    def _record(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active or self.saved is not None or not at_optimizer_step(trainer, batch_idx):
            return  # inside a gradient-accumulation window: saved at its end (every rank agrees on batch_idx)
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.saved = next_hpc_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(self.saved)  # all ranks call it together: no mismatched collectives
        trainer.should_stop = True  # the requeue waits for on_train_end: this batch's metrics are logged first

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.saved is None:
            return
        path, self.saved, self.signalled = self.saved, None, False
        for logger in trainer.loggers:  # flush: SLURM ends the processes soon after the requeue
            logger.finalize("finished")
        scontrol = shutil.which("scontrol")
        self.requeue_from_outside = scontrol is None
        if scontrol is not None:
            # The requeue makes SLURM SIGTERM every task; Lightning's SIGTERM handler runs a collective inside
            # the handler, which blocks until SIGKILL (KillWait) when another rank has already left. The state
            # is saved: SIGTERM may simply end the process. Every rank first, then the requeue.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            trainer.strategy.barrier("slurm_requeue")
        if not trainer.is_global_zero:
            return
        job = slurm_job()
        if scontrol is None:
            print(f"visionlab: pre-emption signal: saved {path}, but scontrol is not on PATH here (inside a container?): "
                  f"requeue from outside with `scontrol requeue {job}` (slurm/visionlab.sbatch does, on exit code "
                  f"{REQUEUE_EXIT_CODE}); the job resumes from {path.name}", flush=True)
            return
        print(f"visionlab: saved {path}; requeueing SLURM job {job}", flush=True)
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"visionlab: `scontrol requeue {job}` failed ({done.stderr.strip() or done.returncode}): requeue it "
                  f"by hand; it resumes from {path.name}", flush=True)
