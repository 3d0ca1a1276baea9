"""Crashes and full disks: a killed fit resumes mid-epoch at its saved step; damaged or missing checkpoints
and full disks end in one line naming the file, with the previous file intact."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from callbacks.checkpoint import AtomicCheckpointIO, LatestCheckpoint
from modules.components.errors import DataError
from modules.components.files import write_atomic
from tests.conftest import ROOT, cli_args
from tests.conftest import one_line_error as _one_line_error

BATCHES, EPOCHS, EVERY, KILL_AT = 8, 2, 3, 11  # steps 1..16; last.ckpt at 3, 6, 8 (epoch end), 9; killed at 11




def _fit_process(root: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    args = cli_args(root, cache, "--trainer.limit_train_batches", str(BATCHES), "--trainer.max_epochs", str(EPOCHS),
                    "--checkpoint.last_every_n_train_steps", str(EVERY),
                    "--trainer.callbacks+=tests.crash_script.ReportSteps", *extra)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _steps(out: str, what: str) -> int:
    line = next(line for line in out.splitlines() if line.startswith(f"visionlab-test: {what}"))
    return int(line.split("global_step=")[1].split()[0])


@pytest.fixture(scope="module")
def crashed_then_resumed(tmp_path_factory, beton_cache):
    """A real fit SIGKILLed mid-epoch 2 (after an in-epoch last.ckpt), then ``fit --ckpt_path last``."""
    root, cache = tmp_path_factory.mktemp("crash"), beton_cache
    crashed = _fit_process(root, cache, "--trainer.callbacks+=tests.crash_script.KillAtStep",
                           "--trainer.callbacks.step", str(KILL_AT))
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = _fit_process(root, cache, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, saved, resumed.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("crashed_then_resumed")  # one 30 s crash-and-resume run, not one per worker
def test_kill_9_mid_epoch_resumes_at_the_saved_step(crashed_then_resumed):
    root, saved, out = crashed_then_resumed
    # The newest save before the kill at step 11 is the in-epoch one at step 9 (epoch 1, one batch in).
    assert saved["global_step"] == 9 and saved["epoch"] == 1
    assert _steps(out, "start") == 9  # neither 0 nor the epoch start (8)
    # An uninterrupted run takes BATCHES * EPOCHS steps: the resumed one ends there too, not one epoch more.
    assert _steps(out, "end") == BATCHES * EPOCHS
    final = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == BATCHES * EPOCHS and final["epoch"] == EPOCHS - 1


@pytest.mark.slow
@pytest.mark.xdist_group("crashed_then_resumed")  # one 30 s crash-and-resume run, not one per worker
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_last_names_it_and_a_readable_older_one(crashed_then_resumed, run_cli, tmp_path, beton_cache,
                                                         capsys, damage):
    root, _, _ = crashed_then_resumed
    folder = tmp_path / "run" / "checkpoints"
    shutil.copytree(root / "checkpoints", folder)
    last = folder / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 64)
    older = next(folder.glob("epoch*.ckpt"))
    args = cli_args(tmp_path / "run", beton_cache, "--ckpt_path", "last")
    assert run_cli(args) == 2
    _one_line_error(capsys, str(last), "truncated or not a checkpoint", str(older), "last-valid")


@pytest.mark.slow
@pytest.mark.xdist_group("crashed_then_resumed")  # one 30 s crash-and-resume run, not one per worker
def test_last_valid_resumes_from_the_newest_readable_checkpoint(crashed_then_resumed, run_cli, tmp_path, beton_cache,
                                                                capsys):
    root, _, _ = crashed_then_resumed
    shutil.copytree(root / "checkpoints", tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 100)
    args = cli_args(tmp_path / "run", beton_cache, "--trainer.max_epochs", str(EPOCHS + 1),
                    "--trainer.callbacks+=tests.crash_script.ReportSteps", "--ckpt_path", "last-valid")
    assert run_cli(args) == 0
    assert "visionlab-test: start global_step=16" in capsys.readouterr().out


def test_missing_ckpt_path_is_one_line(run_cli, tmp_path, beton_cache, capsys):
    missing = tmp_path / "nowhere" / "last.ckpt"
    assert run_cli(cli_args(tmp_path, beton_cache, "--ckpt_path", str(missing))) == 2
    _one_line_error(capsys, f"--ckpt_path {missing} does not exist")
    assert not list(tmp_path.rglob("*.ckpt"))


# --- last.ckpt schedule (in-process, tiny model) --------------------------------------------------------


def _count_last_writes(monkeypatch, callback, steps: int, epochs: int = 1) -> list[int]:
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    written = []
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=steps, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=callback.dirpath)
    original = trainer.save_checkpoint

    def save(path, weights_only=False):
        if Path(path).name == "last.ckpt":
            written.append(trainer.global_step)
        original(path, weights_only)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    trainer.fit(BoringModel())
    return written


def test_last_every_n_train_steps_and_at_epoch_end(monkeypatch, tmp_path):
    callback = LatestCheckpoint(dirpath=str(tmp_path), last_every_n_train_steps=3)
    assert _count_last_writes(monkeypatch, callback, steps=7, epochs=2) == [3, 6, 7, 9, 12, 14]


def test_last_train_time_interval(monkeypatch, tmp_path):
    # A zero interval is due at every step; each epoch end rewrites (after validation).
    callback = LatestCheckpoint(dirpath=str(tmp_path), last_train_time_interval=timedelta(0))
    assert _count_last_writes(monkeypatch, callback, steps=3) == [1, 2, 3, 3]
    # The default (10 minutes) never fires in a seconds-long run: epoch ends only.
    callback = LatestCheckpoint(dirpath=str(tmp_path / "b"), last_train_time_interval=timedelta(minutes=10))
    assert _count_last_writes(monkeypatch, callback, steps=3, epochs=2) == [3, 6]


# --- full disk ------------------------------------------------------------------------------------------


def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_write_atomic_full_disk_keeps_previous_file_and_names_path_and_space(tmp_path):
    target = tmp_path / "train.beton"
    target.write_bytes(b"previous")

    def half_then_full(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 5000)
        _enospc()

    with pytest.raises(DataError) as info:
        write_atomic(target, half_then_full)
    message = str(info.value)
    assert str(target) in message and "no space left" in message and " free in " in message
    assert "needs more than the 5,000 bytes written" in message
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["train.beton"]
    with pytest.raises(DataError, match=r"needs 2.0 MiB"):
        write_atomic(target, _enospc, expected_bytes=2 * 2**20)


def test_write_atomic_other_errors_pass_through(tmp_path):
    def fails(tmp: Path) -> None:
        raise ValueError("bad sample")

    with pytest.raises(ValueError, match="bad sample"):
        write_atomic(tmp_path / "x.bin", fails)
    assert not list(tmp_path.iterdir())


def test_checkpoint_full_disk_through_the_cli(run_cli, tmp_path, beton_cache, capsys, monkeypatch):
    """The 2nd last.ckpt write hits a full disk: one line naming it and the bytes needed; the 1st is intact."""
    writes = []
    original = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".last.ckpt."):
            writes.append(self)
            if len(writes) == 2:
                _enospc()
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    code = run_cli(cli_args(tmp_path, beton_cache, "--checkpoint.last_every_n_train_steps", "1"))
    assert code == 2
    last = tmp_path / "checkpoints" / "last.ckpt"
    _one_line_error(capsys, f"writing {last}", "needs", " free in ", "previous file is unchanged")
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_atomic_checkpoint_io_reads_back_and_refuses_garbage(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "a.ckpt")
    assert io.load_checkpoint(tmp_path / "a.ckpt")["global_step"] == 3
    (tmp_path / "b.ckpt").write_bytes(b"garbage")
    from modules.components.errors import ConfigError

    with pytest.raises(ConfigError, match="b.ckpt"):
        io.load_checkpoint(tmp_path / "b.ckpt")



# --- DDP: a lost rank ends the others, named -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kill_rank", [1, 0])
def test_ddp_rank_killed_mid_epoch_survivor_exits_naming_it(tmp_path, kill_rank):
    """2 CPU processes on gloo; one is SIGKILLed at step 2: the other exits (no hang) with a line naming it."""
    grace = 3.0
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_script.py"), str(kill_rank), str(grace),
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    survivor = 1 - kill_rank
    lines = [line for line in result.stderr.splitlines() if line.startswith("visionlab: error:")]
    assert lines == [f"visionlab: error: rank {kill_rank} of 2 stopped (killed, crashed or hung) at global step 2; "
                     f"rank {survivor} stops too. Look at rank {kill_rank}'s log, then restart all ranks with "
                     f"--ckpt_path last"], result.stderr[-3000:]
    exited, kind = (tmp_path / f"rank{survivor}.exit").read_text().split()
    assert kind == "LostRankError"
    # Bounded: the grace period plus the store's connection timeouts, far below the process-group timeout (300 s).
    assert float(exited) - float((tmp_path / "killed").read_text()) < grace + 30
    if kill_rank == 1:
        assert result.returncode == 2  # the launching process is the survivor


def test_an_error_of_this_ranks_own_is_not_blamed_on_the_waiting_peers():
    """A local exception (a failed subprocess in a callback) is reported as it is, at once: the peers are blocked
    in their next collective, waiting for this rank, and would not check in (CI once named rank 1 as lost when
    rank 0's own callback had raised). A gloo transport error or a DistError does ask who is lost."""
    from types import SimpleNamespace

    from callbacks.lost_rank import LostRankReport

    report = LostRankReport(grace_seconds=0.1)
    asked = []
    report._lost_ranks = lambda trainer: asked.append(trainer) or [1]
    trainer = SimpleNamespace(world_size=2, global_rank=0, global_step=5)
    local = subprocess.CalledProcessError(1, ["scancel"])
    report.on_exception(trainer, None, local)
    assert asked == [] and local.__cause__ is None
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:15251: "
                        "Connection reset by peer")
    report.on_exception(trainer, None, gloo)
    assert asked == [trainer] and "rank 1 of 2 stopped" in str(gloo.__cause__)
    import torch.distributed as dist

    assert LostRankReport.is_collective_failure(dist.DistNetworkError("store")) and not LostRankReport.is_collective_failure(
        ValueError("gloo"))


ONE_CPU_LOADER = """
import os, sys, warnings
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as taskset -c N, a bound SLURM task, docker --cpuset-cpus
from datamodules.base import ImageDataModule
from datamodules.ffcv_loader import FFCVLoader
dm = ImageDataModule(loader=FFCVLoader(cache_dir=sys.argv[1]), image_size=32, batch_size=64, num_workers=2, train_limit=256,
                     val_limit=128)
dm.prepare_data()
dm.setup("fit")
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    batch = next(iter(dm.train_dataloader()))
print("served", len(batch[0]), [str(w.message) for w in seen if "numba may start" in str(w.message)], flush=True)
"""


def test_ffcv_loader_in_a_process_bound_to_one_cpu_serves_and_exits(beton_cache):
    """Bound to one CPU, FFCV's 2 workers exceeded numba's 1 thread (a ValueError from numba), and with 1 worker the
    process hung at exit in numba's TBB unload; now the workers are lowered with a warning and the process ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    done = subprocess.run([sys.executable, "-c", ONE_CPU_LOADER, str(beton_cache)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served 64" in done.stdout and "data.num_workers 2 > the 1 threads" in done.stdout, done.stdout
