"""The tools on several processes (app/ranks.py; gloo on CPU): store-logits and sample write what one process writes."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import timm
import torch

from app.ranks import rank_batches
from app.sample import batch_seeds
from tests.conftest import CONFIGS, ROOT, one_line_error

# One thread in every process: the one-process and the two-process runs then use the same kernels, and each
# batch is the same batch in both (whole batches are dealt to the ranks), so their results are equal bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _two_processes(*args: str, torchrun: bool = False) -> str:
    """``visionlab <tool> ... --devices 2`` from a shell: Fabric starts the second process itself; or both started
    by ``torchrun`` (as srun starts them on a cluster), which Fabric joins."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"] if torchrun \
        else [sys.executable, "-m"]
    cmd = [*launcher, "app.cli", *args, "--devices", "2"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ranks_take_contiguous_blocks_of_whole_batches():
    class Ranks:  # the two attributes of a Fabric that rank_batches reads
        def __init__(self, rank, world):
            self.global_rank, self.world_size = rank, world

    assert rank_batches(5, None) == range(5)
    assert [rank_batches(5, Ranks(r, 2)) for r in range(2)] == [range(0, 3), range(3, 5)]
    assert [list(rank_batches(2, Ranks(r, 3))) for r in range(3)] == [[0], [1], []]
    assert batch_seeds(0, 3) == batch_seeds(0, 5)[:3] != batch_seeds(1, 3)  # batch b's seed: (seed, b) only


@pytest.mark.slow
def test_store_logits_on_two_processes_writes_the_one_process_file(run_cli, tmp_path, one_thread):
    backbone = timm.create_model("test_resnet", num_classes=10)
    teacher = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "hyper_parameters": {"backbone": "test_resnet", "backbone_kwargs": {}, "num_classes": 10, "image_size": 32}},
               teacher)
    # 72 samples in batches of 16: rank 0 stores batches 0-2, rank 1 batches 3-4 (the last one has 8 samples)
    args = ["store-logits", "--config", str(CONFIGS / "data/fashion_mnist_torchvision.yaml"),
            "--data.init_args.train_limit", "72", "--data.init_args.val_limit", "16", "--data.init_args.num_workers", "0",
            "--teacher", str(teacher), "--epochs", "2", "--topk", "3", "--batch_size", "16", "--device", "cpu"]
    single, merged = tmp_path / "single" / "train.vlsl", tmp_path / "two" / "train.vlsl"
    assert run_cli([*args, "--output", str(single)]) == 0
    out = _two_processes(*args, "--output", str(merged), torchrun=True)
    assert out.count("store-logits: wrote") == 1 and "72 samples x 2 epochs" in out  # rank 0 reports
    assert merged.read_bytes() == single.read_bytes()
    assert [p.name for p in merged.parent.iterdir()] == ["train.vlsl"]  # the shard files are gone


@pytest.mark.slow
def test_sample_on_two_processes_writes_the_one_process_files(run_cli, tmp_path, one_thread):
    from app.cli import VisionlabCLI

    cli = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=["--config", str(CONFIGS / "trainer/debug.yaml"),
                                        "--config", str(CONFIGS / "data/fashion_mnist_torchvision.yaml"),
                                        "--config", str(CONFIGS / "diffusion/debug.yaml"),
                                        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
                                        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                                        "--trainer.enable_progress_bar", "false", "--checkpoint.monitor", "null",
                                        "--data.init_args.num_workers", "0", "--data.init_args.train_limit", "64"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = tmp_path / "diffusion.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    # 10 classes x 3 = 30 samples in 8 batches of 4; eta 1 draws fresh noise at every step from each batch's generator
    args = ["sample", "--checkpoint", str(checkpoint), "--per-class", "3", "--batch-size", "4", "--steps", "3",
            "--eta", "1", "--device", "cpu"]
    assert run_cli([*args, "--out", str(tmp_path / "single")]) == 0
    out = _two_processes(*args, "--out", str(tmp_path / "two"))
    assert out.count("sample: wrote 30 PNGs") == 1
    single, two = _files(tmp_path / "single"), _files(tmp_path / "two")
    assert sorted(single) == [f"{c}/{c}_{i:05d}.png" for c in range(10) for i in range(3)]
    assert two == single


@pytest.mark.parametrize("extra, fragment", [(["--per-class", "0"], "--per-class 0 must be at least 1"),
                                             (["--bogus"], "unrecognized arguments: --bogus")])
def test_sample_user_errors_take_the_cli_error_path(run_cli, tmp_path, capsys, extra, fragment):
    assert run_cli(["sample", "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out"), *extra]) == 2
    one_line_error(capsys, fragment)
    assert not (tmp_path / "out").exists()
