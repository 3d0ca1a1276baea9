"""W&B (offline) and MLflow (file store) continue one run across a SLURM requeue, through the CLI.

A requeue is simulated as test_slurm.py does: SLURM's variables for one task of a job, a fit that stops after
``STEPS`` optimizer steps with a ``last.ckpt`` at each, then a second fit of the same job id resuming from it
(``--ckpt_path last``). Nothing contacts a server: W&B runs with ``WANDB_MODE=offline`` (its records are read back
from the ``.wandb`` files it writes) and MLflow with a ``file:`` store under ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tests.conftest import cli_args

wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

DATA = "data/fashion_mnist_torchvision.yaml"  # no FFCV start-up: half the time of a run
BATCHES, STEPS = 4, 2  # one epoch of 4 batches: the first run stops 2 steps in, the requeued one runs the other 2


@pytest.fixture
def slurm(monkeypatch, tmp_path):
    """Sets SLURM's variables for one task of a job (call it with the job id) and keeps both loggers offline."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "WANDB_", "MLFLOW_")):
            monkeypatch.delenv(key)
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)

    def job(job_id: str) -> None:
        for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1",
                           "SLURM_JOB_NAME": "visionlab", "SLURM_JOB_ID": job_id, "SLURM_PROCID": "0",
                           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
            monkeypatch.setenv(key, value)

    return job


def _fit(run_cli, root: Path, logger: Path, max_steps: int, *extra: str) -> None:
    args = cli_args(root, None, "--config", str(logger), "--trainer.limit_train_batches", str(BATCHES),
                    "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "1", "--trainer.max_steps", str(max_steps),
                    "--checkpoint.last_every_n_train_steps", "1", *extra, data=DATA)
    try:
        assert run_cli(args) == 0
    finally:
        if wandb.run is not None:
            wandb.finish()
        # What the end of the process does on a cluster: the W&B service writes the offline .wandb file
        # asynchronously, and only teardown waits until it is complete on disk (read too early under load, the
        # file of the last run held no run record yet).
        wandb.teardown()


def _requeued_job(run_cli, slurm, root: Path, logger: Path, job: str = "4242") -> None:
    """A job's first run (steps 1..STEPS), then the requeued one resuming from its last.ckpt (to the epoch's end)."""
    slurm(job)
    _fit(run_cli, root, logger, STEPS)
    _fit(run_cli, root, logger, 2 * STEPS, "--ckpt_path", "last")


# --- W&B --------------------------------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records
    are (crc32: 4, length: 2 LE, type: 1) + data, a record split across blocks as FIRST, MIDDLE..., LAST."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending, block = path.read_bytes(), [], b"", 32 * 1024
    assert data[:4] == b":W&B", path
    offset = 7
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run(folder: Path) -> tuple[str, list[int]]:
    """(run id, the ``trainer/global_step`` of each ``train/loss`` logged) of one offline run folder."""
    records = _wandb_records(next(folder.glob("run-*.wandb")))
    run_ids = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert len(run_ids) == 1, run_ids
    steps = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in items:
                steps.append(items["trainer/global_step"])
    return run_ids.pop(), steps


def _wandb_logger(tmp_path: Path) -> Path:
    config = tmp_path / "wandb.yaml"
    config.write_text(f"trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
                      f"    init_args:\n      project: visionlab-test\n      save_dir: {tmp_path}\n      offline: true\n")
    return config


def test_wandb_offline_run_continues_its_id_and_steps_after_a_requeue(run_cli, slurm, tmp_path):
    _requeued_job(run_cli, slurm, tmp_path / "run", _wandb_logger(tmp_path))
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))  # one per process, named by time then run id
    assert len(folders) == 2, folders
    (first_id, first_steps), (second_id, second_steps) = (_wandb_run(folder) for folder in folders)
    assert first_id == second_id == "slurm-4242"  # `wandb sync` appends both folders to this one run
    # log_every_n_steps 1: Lightning logs the loss of the batch that brings the step count to n at step n - 1.
    assert first_steps == [0, 1]
    assert second_steps == [2, 3]  # not [0, 1] again: the axis continues at the restored global step


def test_wandb_another_job_is_another_run(run_cli, slurm, tmp_path):
    logger = _wandb_logger(tmp_path)
    for job in ("4242", "4243"):
        slurm(job)
        _fit(run_cli, tmp_path / job, logger, 1)
    ids = [_wandb_run(folder)[0] for folder in sorted((tmp_path / "wandb").glob("offline-run-*"))]
    assert sorted(ids) == ["slurm-4242", "slurm-4243"]


# --- MLflow ---------------------------------------------------------------------------------------------------------
def _mlflow_logger(tmp_path: Path) -> tuple[Path, MlflowClient]:
    uri = f"file:{tmp_path / 'mlruns'}"
    config = tmp_path / "mlflow.yaml"
    config.write_text(f"trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.MLFlowLogger\n"
                      f"    init_args:\n      experiment_name: visionlab-test\n      tracking_uri: {uri}\n")
    return config, MlflowClient(uri)


def _mlflow_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("visionlab-test")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_mlflow_file_store_run_continues_its_id_and_steps_after_a_requeue(run_cli, slurm, tmp_path):
    config, client = _mlflow_logger(tmp_path)
    _requeued_job(run_cli, slurm, tmp_path / "run", config)
    runs = _mlflow_runs(client)
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the requeued process found the job's run
    assert runs[0].data.tags["slurm_job_id"] == "4242"
    steps = [metric.step for metric in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [0, 1, 2, 3]  # both processes' losses on one strictly increasing axis


def test_mlflow_another_job_is_another_run(run_cli, slurm, tmp_path):
    config, client = _mlflow_logger(tmp_path)
    for job in ("4242", "4243"):
        slurm(job)
        _fit(run_cli, tmp_path / job, config, 1)
    assert [r.data.tags["slurm_job_id"] for r in _mlflow_runs(client)] == ["4242", "4243"]
