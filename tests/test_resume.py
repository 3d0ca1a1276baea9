"""Sample-exact resume through the CLI: a 2-epoch fit SIGKILLed at several steps and resumed each time with
``--ckpt_path last`` trains on the batches (sample indices and pixels) of an uninterrupted run and ends with its
weights, for both loader back-ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.base import ImageDataModule, loader_batch
from tests.conftest import CONFIGS, ROOT, cli_args, ffcv_data, one_line_error, torchvision_data
from tests.resume_script import trained_batches

pytestmark = pytest.mark.slow

BATCHES, EPOCHS, EVERY = 8, 2, 3  # steps 1..16; last.ckpt at 3, 6, 8 (epoch end, after validation), 9, 12, 15, 16
# Killed (SIGKILL, in on_train_batch_end, before that step's own save) at step 5: resumes from step 3, two batches
# redone; at 9: resumes from the end-of-epoch save (step 8); at 14: resumes from step 12, saved by a resumed process.
KILLS = (5, 9, 14)
DATA = {"ffcv": "data/fashion_mnist.yaml", "torchvision": "data/fashion_mnist_torchvision.yaml"}


def _fit(root: Path, cache: Path, data: str, *extra: str) -> subprocess.CompletedProcess:
    args = cli_args(root, None if "torchvision" in data else cache, "--trainer.limit_train_batches", str(BATCHES), "--trainer.max_epochs", str(EPOCHS),
                    "--checkpoint.last_every_n_train_steps", str(EVERY),
                    "--data.init_args.batches", "tests.resume_script.WithIndex",
                    "--trainer.callbacks+=tests.resume_script.RecordBatches",
                    "--trainer.callbacks.folder", str(root / "batches"), *extra, data=data)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def _weights(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == BATCHES * EPOCHS
    return checkpoint["state_dict"]


@pytest.mark.parametrize("backend", ["torchvision", "ffcv"])
def test_killed_three_times_trains_on_the_uninterrupted_batches_and_weights(tmp_path, beton_cache, backend):
    whole = _fit(tmp_path / "whole", beton_cache, DATA[backend])
    assert whole.returncode == 0, whole.stderr[-3000:]

    root, resume = tmp_path / "killed", ()
    for step in KILLS:
        killed = _fit(root, beton_cache, DATA[backend], *resume, "--trainer.callbacks+=tests.crash_script.KillAtStep",
                      "--trainer.callbacks.step", str(step))
        assert killed.returncode == -9, killed.stderr[-3000:]
        resume = ("--ckpt_path", "last")
    resumed = _fit(root, beton_cache, DATA[backend], *resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a loader that restarts its epoch

    expected, got = trained_batches(tmp_path / "whole" / "batches"), trained_batches(root / "batches")
    assert sorted(expected) == sorted(got) == list(range(EPOCHS))
    for epoch in expected:
        assert [b["batch"] for b in got[epoch]] == list(range(BATCHES))
        assert [b["index"] for b in got[epoch]] == [b["index"] for b in expected[epoch]], epoch
        assert [b["pixels"] for b in got[epoch]] == [b["pixels"] for b in expected[epoch]], epoch
    # The epochs differ (the order follows the trainer's epoch, not the process's count of epochs).
    assert expected[0][0]["index"] != expected[1][0]["index"]
    # Same batches, same float operations in the same order on one machine: bitwise the same weights.
    reference, weights = _weights(tmp_path / "whole"), _weights(root)
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name


def test_a_run_stopped_by_max_steps_continues_with_a_larger_max_steps(tmp_path):
    """Train 5 steps (mid-epoch 0, no scheduled save at 5), then ``--ckpt_path last`` with ``max_steps`` 12: the two
    processes train the batches (indices, pixels) of one run to step 12, the rest of epoch 0 included, and end with
    its weights (at a constant lr: a cosine schedule's length is max_steps, so extending it changes the lr of
    the steps already trained, by design). Lightning counts the cut epoch as processed before its epoch-end hooks: a last.ckpt saved there
    resumed as the next epoch and ended at step 8, one max_epochs early."""

    def fit(root: Path, max_steps: int, *extra: str) -> subprocess.CompletedProcess:
        # A constant lr (min_lr_ratio 1): the cosine horizon is max_steps, which this test changes on purpose.
        done = _fit(root, Path("unused"), DATA["torchvision"], "--trainer.max_steps", str(max_steps),
                    "--model.init_args.optim.min_lr_ratio", "1.0", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    fit(tmp_path / "whole", 12)
    first = fit(tmp_path / "split", 5)
    assert "`max_steps=5` reached" in first.stderr
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    fit(tmp_path / "split", 12, "--ckpt_path", "last")

    expected, got = trained_batches(tmp_path / "whole" / "batches"), trained_batches(tmp_path / "split" / "batches")
    assert [len(expected[0]), len(expected[1])] == [BATCHES, 12 - BATCHES]
    assert [b["step"] for e in (0, 1) for b in got[e]] == list(range(1, 13))  # the step axis continues at 6
    assert [[b["index"], b["pixels"]] for e in (0, 1) for b in got[e]] == \
        [[b["index"], b["pixels"]] for e in (0, 1) for b in expected[e]]
    reference = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    final = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == reference["global_step"] == 12
    for name, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name


def test_a_changed_world_size_inside_an_epoch_is_one_line(run_cli, tmp_path, beton_cache, capsys):
    """A checkpoint saved 1 batch into an epoch by 2 processes, resumed by 1: one line saying what to set."""
    args = cli_args(tmp_path, None, "--checkpoint.last_every_n_train_steps", "1", "--trainer.max_steps", "1",
                    data=DATA["torchvision"])
    assert run_cli(args) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    position = checkpoint["ImageDataModule"]["train_position"]
    assert position == {"epoch": 0, "batches": 1, "batch_size": 64, "world_size": 1, "complete": False, "samples": 64}
    checkpoint["ImageDataModule"]["train_position"] = {**position, "world_size": 2, "samples": 128}
    torch.save(checkpoint, last)
    capsys.readouterr()
    assert run_cli([*args[:-2], "--trainer.max_steps", "2", "--ckpt_path", "last"]) == 2
    one_line_error(capsys, "saved 1 batches into epoch 0 by 2 process(es) of data.batch_size 64, and this run has 1",
                   "Resume with 2 process(es)", "epoch*.ckpt")


def _epoch(loader) -> list[tuple[list[int], torch.Tensor]]:
    return [(b["index"].tolist(), b["image"]) for b in map(loader_batch, loader)]


@pytest.mark.parametrize(("backend", "settings", "world"), [
    ("torchvision", {}, 1), ("torchvision", {}, 2),
    ("ffcv", {"order": "quasi_random", "os_cache": False}, 1), ("ffcv", {"repeated_augmentation": 3}, 2),
])
def test_a_resumed_epoch_is_the_rest_of_the_uninterrupted_one(monkeypatch, beton_cache, backend, settings, world):
    """In process, the last rank of ``world``: epoch 1 whole, then epoch 1 resumed 2 batches in (indices and pixels)."""
    monkeypatch.setattr(ImageDataModule, "yields_index", property(lambda self: True))
    common = dict(image_size=16, batch_size=16, num_workers=1, train_limit=128, val_limit=16, **settings)
    dm = ffcv_data(cache_dir=beton_cache, **common) if backend == "ffcv" else torchvision_data(**common)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=world, global_rank=world - 1, training=True, current_epoch=1,
                                 num_training_batches=128 // world // 16)
    loader = dm.train_dataloader()
    whole = _epoch(loader)
    assert len(whole) == len(loader) == 128 // world // 16
    dm.load_state_dict({"train_position": {"epoch": 1, "batches": 2, "batch_size": 16, "world_size": world,
                                           "complete": False, "samples": 2 * 16 * world}})
    rest = _epoch(loader)
    assert [i for i, _ in rest] == [i for i, _ in whole[2:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, whole[2:]))
    dm.trainer.current_epoch = 0
    assert [i for i, _ in _epoch(loader)] != [i for i, _ in whole]  # the epoch is the trainer's
    dm.load_state_dict({"train_position": {"epoch": 0, "batches": len(whole), "batch_size": 16, "world_size": 1,
                                           "complete": True, "samples": 0}})
    assert _epoch(loader) == []  # an epoch saved complete is skipped whole, whatever the world size now


def _kill_at_step_7_resume_and_compare_batches(fit, tmp_path: Path, check_killed=lambda: True) -> None:
    """An uninterrupted 2-rank run, one SIGKILLed at step 7 and resumed with ``--ckpt_path last``: each rank's
    batches (sample indices and pixel hashes) over both epochs equal the uninterrupted run's."""
    whole = fit(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = fit(tmp_path / "killed", "--trainer.callbacks+=tests.crash_script.KillAtStep", "--trainer.callbacks.step", "7")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert check_killed()
    resumed = fit(tmp_path / "killed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        expected, got = trained_batches(tmp_path / "whole" / "batches", rank), trained_batches(tmp_path / "killed" / "batches", rank)
        assert [[b["index"], b["pixels"]] for e in (0, 1) for b in got[e]] == \
            [[b["index"], b["pixels"]] for e in (0, 1) for b in expected[e]], rank


def test_ddp_two_gloo_ranks_killed_and_resumed_train_on_the_uninterrupted_batches(tmp_path):
    """2 CPU processes (DDP, gloo), torchvision back-end, 2 epochs of 4 steps; both ranks SIGKILLed at step 7 (the
    newest last.ckpt is step 6's, two batches into epoch 1) and resumed: each rank's batches and the weights equal
    the uninterrupted run's."""
    ddp = ("--config", str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml"), "--trainer.limit_train_batches", "4")

    def fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
        return _fit(root, Path("unused"), DATA["torchvision"], *ddp, *extra)

    _kill_at_step_7_resume_and_compare_batches(fit, tmp_path)
    first = trained_batches(tmp_path / "whole" / "batches", 0)[0][0]["index"]
    assert not set(first) & set(trained_batches(tmp_path / "whole" / "batches", 1)[0][0]["index"])  # sharded
    reference = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    final = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == reference["global_step"] == 8
    for name, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name


@pytest.mark.parametrize(("accumulate", "batches", "saved"), [(1, 5, [0, 1, 2, 3, 4]), (3, 7, [2, 5, 6]), (2, 4, [1, 3])])
def test_resumable_saves_wait_for_the_end_of_an_accumulation_window(accumulate, batches, saved):
    from callbacks.checkpoint import at_optimizer_step

    trainer = SimpleNamespace(accumulate_grad_batches=accumulate, num_training_batches=batches)
    assert [i for i in range(batches) if at_optimizer_step(trainer, i)] == saved  # the epoch's last batch steps too


def _sharded_weights(last: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The global step and full (unsharded) weights of a sharded ``last.ckpt`` folder, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from modules.components.checkpoints import load_checkpoint

    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # sharded: one file per rank
    whole = last.parent / f"{last.name}.whole.pt"  # torch's own conversion of the shards into one file
    dcp_to_torch_save(last, whole)
    weights = torch.load(whole, weights_only=True)["state_dict"]
    whole.unlink()
    return load_checkpoint(last / "meta.pt")["global_step"], weights  # meta.pt: Lightning's non-tensor state


def test_fsdp_two_gloo_ranks_killed_and_resumed_from_a_sharded_last_checkpoint(tmp_path):
    """The documented FSDP composition (configs/trainer/gpu.yaml + fsdp.yaml: sharded ``last.ckpt`` folders) on 2 CPU
    processes (gloo), 2 epochs of 4 steps; both ranks SIGKILLed at step 7 (the newest sharded last.ckpt is step 6's,
    two batches into epoch 1) and resumed with ``--ckpt_path last``: each rank's batches and the weights equal the
    uninterrupted run's."""

    def fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
        args = ["fit", "--config", str(CONFIGS / "trainer/gpu.yaml"), "--config", str(CONFIGS / "trainer/fsdp.yaml"),
                "--config", str(CONFIGS / DATA["torchvision"]), "--config", str(CONFIGS / "classification/debug.yaml"),
                "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", str(EPOCHS),
                "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                "--data.init_args.num_workers", "0", "--checkpoint.last_every_n_train_steps", str(EVERY),
                "--data.init_args.batches", "tests.resume_script.WithIndex",
                "--trainer.callbacks+=tests.resume_script.RecordBatches", "--trainer.callbacks.folder", str(root / "batches"),
                *extra]
        return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=900)

    _kill_at_step_7_resume_and_compare_batches(
        fit, tmp_path, check_killed=lambda: _sharded_weights(tmp_path / "killed" / "checkpoints" / "last.ckpt")[0] == 6)
    # The shards restore the weights and SGD momentum exactly (no re-sharding: same 2 ranks), and the resumed run
    # repeats the same bf16-autocast float operations in the same order on the same batches: bitwise the same weights.
    step, reference = _sharded_weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    final_step, final = _sharded_weights(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert step == final_step == 8
    for name, value in reference.items():
        assert torch.equal(final[name], value), name


def test_resume_paths_take_a_sharded_checkpoint_folder(tmp_path):
    """``last`` / ``last-valid`` / an explicit path accept a sharded ``last.ckpt`` folder (meta.pt + torch's .metadata
    index + shards); one whose index is missing (a save killed before it finished) is refused like a truncated file."""
    import os

    from callbacks.checkpoint import resolve_resume_path
    from modules.components.errors import ConfigError

    older, last = tmp_path / "epoch000-step4.ckpt", tmp_path / "last.ckpt"
    torch.save({"global_step": 4}, older)
    last.mkdir()
    torch.save({"global_step": 6}, last / "meta.pt")
    (last / ".metadata").write_bytes(b"index")
    os.utime(older, (1, 1))  # the folder is the newer of the two
    assert resolve_resume_path("last", tmp_path) == "last"
    assert resolve_resume_path("last-valid", tmp_path) == str(last)
    assert resolve_resume_path(str(last), tmp_path) == str(last)
    (last / ".metadata").unlink()
    with pytest.raises(ConfigError, match=f"{last} is truncated or not a checkpoint; the newest readable checkpoint "
                                          f"there is {older}"):
        resolve_resume_path("last", tmp_path)
    assert resolve_resume_path("last-valid", tmp_path) == str(older)
