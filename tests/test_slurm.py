"""The project's sbatch template on a real two-node SLURM cluster: DDP across nodes, preemption + requeue."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import torch

from tests.conftest import CONFIGS, ROOT
from tests.slurm.cluster import Cluster, available

pytestmark = pytest.mark.slow
TEMPLATE = ROOT / "slurm" / "visionlab.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _fit_args(run_dir, cache, *extra):
    return ["fit", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "data/fashion_mnist.yaml"),
            "--config", str(CONFIGS / "classification/debug.yaml"),
            "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.cache_dir", str(cache), "--data.init_args.num_workers", "1", *extra]


def _log(run_dir, job_id) -> str:
    return (run_dir / f"visionlab-{job_id}.out").read_text()


def test_two_nodes_train_one_model(cluster, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = cluster.sbatch(str(TEMPLATE), *_fit_args(run, tmp_path / "cache", "--trainer.max_epochs", "1"), cwd=run)
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


def test_preempted_job_requeues_and_resumes(cluster, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    epochs = 12
    job = cluster.sbatch(str(TEMPLATE), *_fit_args(run, tmp_path / "cache", "--trainer.max_epochs", str(epochs)), cwd=run)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline:
        assert cluster.job(job).get("JobState") in {"PENDING", "RUNNING", "CONFIGURING"}, _log(run, job)[-3000:]
        time.sleep(0.5)
    assert last.exists(), "the job never finished its first epoch"
    # What SLURM sends before the time limit (--signal=SIGUSR1@90), delivered now, mid-run.
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True)
    info = cluster.wait(job)
    deadline = time.time() + 120  # the state can read COMPLETED a moment before the last rank exits
    while "visionlab: last checkpoint" not in _log(run, job) and time.time() < deadline:
        time.sleep(0.5)
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert int(info["Restarts"]) == 1, log[-3000:]
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, log[-3000:]
    saved = torch.load(hpc[0], weights_only=False)
    assert 0 < saved["global_step"] < epochs * 4 and saved["optimizer_states"][0]["state"]
    assert f"Restored all states from the checkpoint at {hpc[0]}" in log.replace("\n", "")
    assert "restart 1" in log
    # The resumed run continued the step count instead of starting over.
    assert torch.load(last, weights_only=False)["global_step"] == epochs * 4
