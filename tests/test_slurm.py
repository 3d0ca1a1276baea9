"""SLURM: the requeue callback in process, and the project's sbatch template on a real two-node cluster (DDP across
nodes, preemption + requeue into the same TensorBoard version folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.slurm import REQUEUE_EXIT_CODE, SIGNAL_VARIABLE, SLURMRequeue, next_hpc_checkpoint, parse_signal
from modules.components.errors import ConfigError
from tests.conftest import CONFIGS, ROOT, cli_args
from tests.slurm.cluster import Cluster, available

TEMPLATE = ROOT / "slurm" / "visionlab.sbatch"
JOB = "4242"


# --- in process: a one-task SLURM job (environment variables as srun sets them) ------------------------------
@pytest.fixture
def slurm_job(monkeypatch, tmp_path):
    """SLURM's variables for one task of job 4242, a PATH without scontrol (or srun), signal handlers restored."""
    for key in list(os.environ):
        if key.startswith("SLURM_") or key == SIGNAL_VARIABLE:
            monkeypatch.delenv(key)
    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "visionlab",
                       "SLURM_JOB_ID": JOB, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # like a container without SLURM's client tools
    unhandled = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    for s in (signal.SIGUSR1, signal.SIGUSR2):  # a signal nobody handles must fail the test, not end pytest
        signal.signal(s, lambda signum, frame: unhandled.append(signum))
    yield unhandled
    for s, handler in saved.items():
        signal.signal(s, handler)


class SendSignal(pl.Callback):
    """Deliver ``signum`` to this process after optimizer step ``step`` (what SLURM sends before the time limit)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("template, sent", [(None, signal.SIGUSR1), ("USR2", signal.SIGUSR2), ("SIGUSR2", signal.SIGUSR2)])
def test_without_scontrol_the_job_checkpoints_and_says_to_requeue_from_outside(slurm_job, tmp_path, capsys,
                                                                               monkeypatch, template, sent):
    if template:
        monkeypatch.setenv(SIGNAL_VARIABLE, template)  # what the sbatch template exports from its --signal line
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, callbacks=[SendSignal(sent, 3), SLURMRequeue()])
    trainer.fit(BoringModel())
    assert slurm_job == []  # the callback handled the signal itself
    assert trainer.global_step == 3  # stopped at the batch the signal arrived in (of 32)
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert saved["global_step"] == 3 and saved["optimizer_states"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("visionlab:")]
    assert len(lines) == 1 and f"scontrol requeue {JOB}" in lines[0] and "from outside" in lines[0], lines
    assert str(tmp_path / "hpc_ckpt_1.ckpt") in lines[0]


def test_signal_names_and_checkpoint_numbering(tmp_path):
    assert parse_signal("USR2") == parse_signal("sigusr2") == parse_signal(str(int(signal.SIGUSR2))) == signal.SIGUSR2
    with pytest.raises(ConfigError, match="not a signal"):
        parse_signal("USR9")
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_3.ckpt", "hpc_ckpt_10.ckpt", "last.ckpt", "hpc_ckpt_x.ckpt"):
        (tmp_path / name).touch()
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_11.ckpt"


def test_pre_empted_inside_a_container_the_cli_exits_75_for_the_batch_script_to_requeue(slurm_job, run_cli, tmp_path,
                                                                                        capsys):
    # the sbatch template requeues from outside the container when srun ends with this code (slurm/visionlab.sbatch)
    args = cli_args(tmp_path, None, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                    "--trainer.callbacks+=tests.test_slurm.SendSignal", "--trainer.callbacks.signum",
                    str(int(signal.SIGUSR1)), "--trainer.callbacks.step", "2", data="data/fashion_mnist_torchvision.yaml")
    assert run_cli(args) == REQUEUE_EXIT_CODE == 75
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 2
    assert f"scontrol requeue {JOB}" in capsys.readouterr().out and slurm_job == []
    template = TEMPLATE.read_text()
    assert 'if [ "$status" -eq 75 ]; then' in template and 'scontrol requeue "$job"' in template


def test_a_slurm_job_logs_to_the_version_folder_of_its_job_id(slurm_job, tmp_path, beton_cache):
    from app.cli import VisionlabCLI

    args = cli_args(tmp_path, beton_cache)[1:]  # the default TensorBoardLogger (app/cli.py), no version
    cli = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args)
    assert cli.trainer.logger.version == int(JOB)  # a requeued run (same job id) writes to the same folder
    pinned = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                          run=False, args=[*args, "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
                                           "--trainer.logger.init_args.save_dir", str(tmp_path),
                                           "--trainer.logger.init_args.version", "mine"])
    assert pinned.trainer.logger.version == "mine"  # a version the config chose is kept


# --- a real two-node cluster -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    # the jobs import tests.slurm.preempt (a callback given on the command line)
    cluster.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


IMAGE_VARIABLE = "VISIONLAB_TEST_CH_IMAGE"  # a `ch-convert`ed visionlab image (scripts/ci-container.sh sets it)


class Launch:
    """How the job's tasks run: on the nodes themselves, or each inside the visionlab image with charliecloud's
    ``ch-run`` (slurm/visionlab.sbatch with VISIONLAB_IMAGE). ``path`` turns a host path of the test into the one the
    job's command line uses: inside the image the run folder is /workspace/runs, the cache /cache, configs/ its own."""

    def __init__(self, kind: str, tmp_path):
        self.kind, self.run, self.cache = kind, tmp_path / "run", tmp_path / "cache"
        self.run.mkdir()
        self.image = os.environ.get(IMAGE_VARIABLE) if kind == "charliecloud" else None
        if kind == "charliecloud" and not self.image:
            pytest.skip(f"{IMAGE_VARIABLE} names no charliecloud image (scripts/ci-container.sh makes one)")

    def path(self, host) -> str:
        if self.image is None:
            return str(host)
        for outside, inside in ((self.run, "/workspace/runs"), (self.cache, "/cache"), (CONFIGS, "/workspace/configs")):
            if host == outside or outside in host.parents:
                return f"{inside}/{host.relative_to(outside)}".rstrip("/.")
        raise ValueError(f"{host} is not inside the container")

    def sbatch_options(self) -> list[str]:
        if self.image is None:
            return []
        # the test's own callbacks (tests.slurm.preempt, tests.resume_script) are not in the image: a copy of them,
        # bound at /mnt/0, is on the container's PYTHONPATH
        shim = self.run.parent / "shim"
        for module in ("__init__.py", "resume_script.py", "slurm/__init__.py", "slurm/preempt.py"):
            (shim / "tests" / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "tests" / module, shim / "tests" / module)
        self.cache.mkdir(exist_ok=True)
        return [f"--export=ALL,VISIONLAB_IMAGE={self.image},VISIONLAB_RUNS={self.run},VISIONLAB_CACHE={self.cache},"
                f"VISIONLAB_BINDS={shim}:/mnt/0,PYTHONPATH=/mnt/0"]


@pytest.fixture(params=["bare", "charliecloud"])
def launch(request, tmp_path):
    return Launch(request.param, tmp_path)


def _fit_args(launch, cache, *extra, data="data/fashion_mnist.yaml"):
    run_dir = launch.path(launch.run)
    return ["fit", "--config", launch.path(CONFIGS / "trainer/cpu.yaml"), "--config", launch.path(CONFIGS / data),
            "--config", launch.path(CONFIGS / "classification/debug.yaml"),
            "--trainer.default_root_dir", run_dir,
            "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", run_dir,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.num_workers", "1",
            *(["--data.init_args.loader.init_args.cache_dir", launch.path(cache)] if cache else []), *extra]


def _log(run_dir, job_id) -> str:
    return (run_dir / f"visionlab-{job_id}.out").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("slurm_cluster")  # one cluster (daemons, ports, munge) per machine
def test_two_nodes_train_one_model(cluster, launch):
    run = launch.run
    job = cluster.sbatch(*launch.sbatch_options(), str(TEMPLATE),
                         *_fit_args(launch, launch.cache, "--trainer.max_epochs", "1"), cwd=run)
    info = cluster.wait(job)
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 nodes x 1 tasks" in log
    # Both ranks joined one process group of world size 2 (one per node).
    assert re.search(r"GLOBAL_RANK: 0, MEMBER: 1/2", log) and re.search(r"GLOBAL_RANK: 1, MEMBER: 2/2", log)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["epoch000-step4.ckpt", "last.ckpt"]  # 512 samples / 2 ranks / batch 64 = 4 steps
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert len(list(run.rglob("events.out.tfevents.*"))) == 1  # metrics logged once, by rank 0
    assert log.count("visionlab: best val/acc1") == 1


def _errors(log: str) -> str:
    """Each traceback's last lines and every error line in the job's log (the tail alone may hold only the
    consequences, e.g. the other rank's report)."""
    lines, found = log.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith(("Traceback", "visionlab: error")) or "Error:" in line[:80]:
            found.append("\n".join(lines[i:i + 1] if not line.startswith("Traceback") else lines[i:i + 40]))
    return "--- errors in the log:\n" + "\n".join(found)[-6000:]


def _steps(events_file) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [event.step for event in EventAccumulator(str(events_file)).Reload().Scalars("train/loss")]


@pytest.mark.slow
@pytest.mark.xdist_group("slurm_cluster")  # one cluster (daemons, ports, munge) per machine
def test_preempted_job_requeues_and_resumes_in_the_same_version_folder(cluster, tmp_path, launch):
    run = launch.run
    # The template with another signal in its one --signal line: SLURM and visionlab both follow that line.
    text = TEMPLATE.read_text()
    assert text.count("#SBATCH --signal=SIGUSR1@90") == 1
    template = tmp_path / "visionlab.sbatch"
    template.write_text(text.replace("#SBATCH --signal=SIGUSR1@90", "#SBATCH --signal=SIGUSR2@90"))
    steps, preempted = 8, 5  # 2 epochs of 4 steps; SLURM's signal arrives after step 5, mid-way through epoch 2
    signal_at = ["--trainer.callbacks+=tests.slurm.preempt.SignalAtStep", "--trainer.callbacks.step", str(preempted),
                 "--trainer.callbacks.signal_name", "USR2",
                 "--trainer.callbacks.request_file", launch.path(run / "signal-request")]
    # torchvision loaders (the FFCV launch is the test above): FFCV would compile its numba pipelines again in
    # each of the 4 processes (2 ranks x 2 runs), which is most of this job's time after Python's start-up
    record = ["--data.init_args.batches", "tests.resume_script.WithIndex",  # each rank writes its batches' samples
              "--trainer.callbacks+=tests.resume_script.RecordBatches", "--trainer.callbacks.folder",
              launch.path(run / "batches")]
    args = _fit_args(launch, None, "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
                     "--data.init_args.num_workers", "0", *signal_at, *record, data="data/fashion_mnist_torchvision.yaml")
    job = cluster.sbatch(*launch.sbatch_options(), str(template), *args, cwd=run)
    if launch.image:  # no scancel in the image: the job asks for SLURM's signal in a file, and it is sent from here
        deadline = time.time() + 300
        while not (run / "signal-request").exists() and time.time() < deadline and cluster.job(job).get("JobState") \
                not in cluster.FINISHED:
            time.sleep(0.2)
        assert (run / "signal-request").exists(), f"no signal request: {_errors(_log(run, job))}\n{_log(run, job)[-3000:]}"
        cluster.signal(job, "USR2")
    cluster.start_requeued_now(job)
    info = cluster.wait(job)
    deadline = time.time() + 60  # the state can read COMPLETED a moment before the last rank exits
    while "visionlab: last checkpoint" not in _log(run, job) and time.time() < deadline:
        time.sleep(0.2)
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED", (f"{info.get('JobState')}, {info.get('Restarts')} restarts: "
                                             f"{_errors(log)}\n{log[-3000:]}\n{cluster.diagnose(job)}")
    assert int(info["Restarts"]) == 1, log[-3000:]
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"], log[-3000:]
    saved = torch.load(hpc[0], weights_only=False)
    assert saved["global_step"] == preempted and saved["optimizer_states"][0]["state"]  # saved where it stopped
    assert f"Restored all states from the checkpoint at {launch.path(hpc[0])}" in log.replace("\n", "")
    assert "restart 1" in log and f"requeueing SLURM job {job}" in log
    if launch.image:  # the requeue came from the batch script, outside the container, after the tasks exited 75
        assert f"requeueing SLURM job {job} from the batch script" in log
    # The resumed run continued the step count instead of starting over...
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    # ... in the same TensorBoard version folder (the job id), its steps continuing the first run's axis.
    versions = [p.name for p in (run / "lightning_logs").iterdir()]
    assert versions == [f"version_{job}"], versions
    # Sample-exact: the requeued run trained on the batches the first one had not reached. Each rank recorded
    # steps 1..5 in the first run and 6..8 in the second, no batch twice; in each epoch the two ranks together
    # saw all 512 training samples once (the second epoch in another order, resumed mid-way on the same order).
    seen = {}
    for rank in (0, 1):
        lines = [json.loads(line) for line in (run / "batches" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(1, steps + 1)), (rank, [r["step"] for r in lines])
        assert [(r["epoch"], r["batch"]) for r in lines] == [(e, b) for e in range(2) for b in range(4)]
        seen[rank] = lines
    for epoch in range(2):
        samples = [i for rank in (0, 1) for r in seen[rank] if r["epoch"] == epoch for i in r["index"]]
        assert len(samples) == len(set(samples)) == 512, epoch
    first, second = ([i for r in seen[0] if r["epoch"] == e for i in r["index"]] for e in range(2))
    assert first != second  # reshuffled per epoch
    first, second = [_steps(f) for f in sorted((run / "lightning_logs" / versions[0]).glob("events.out.tfevents.*"))]
    assert first and second and max(first) < min(second), (first, second)
    assert sorted(first + second) == list(range(steps)), (first, second)
