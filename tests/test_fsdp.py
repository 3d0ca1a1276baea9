"""Sharded training (FSDP2 via Lightning's ModelParallelStrategy) on 2 CPU processes (gloo).

Lightning's FSDPStrategy (FSDP1) refuses CPU accelerators and torch's FSDP1 needs a non-CPU device; FSDP2's
``fully_shard`` runs on CPU, so the same strategy as configs/trainer/fsdp.yaml is tested here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import CONFIGS, ROOT, cli_args, one_line_error
from tests.resume_script import trained_batches

pytestmark = pytest.mark.slow


def _run(tmp_path, *extra) -> dict[str, dict]:
    """All phases of tests/fsdp_script.py in one ``torchrun`` launch (2 processes start once, not once per run)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_script.py"), "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {phase: torch.load(out / f"{phase}.pt", weights_only=True) for phase in ("ddp", "fsdp", "resume", "at_save")} | {
        "shards": out / "sharded.ckpt"}


def test_fsdp_matches_ddp_and_resumes_from_a_sharded_checkpoint(tmp_path):
    runs = _run(tmp_path)  # 8 SGD steps: 2 epochs of 4 (64 samples, 2 ranks x 8); sharded checkpoint after step 4
    ddp, fsdp, resumed = runs["ddp"], runs["fsdp"], runs["resume"]
    assert not ddp["sharded"] and "backbone.blocks.0.attn.qkv.weight" in fsdp["sharded"]  # really sharded
    assert ddp["global_step"] == fsdp["global_step"] == 8
    for key, value in ddp["weights"].items():
        # float32 gradients reduced in another order: ~eps x terms, far below what 4 SGD steps of lr 0.05 move
        torch.testing.assert_close(fsdp["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)

    assert runs["shards"].is_dir() and len(list(runs["shards"].glob("*.distcp"))) == 2  # one shard file per rank
    assert resumed["global_step"] == 8 and sorted(resumed["lrs"]) == [4, 5, 6, 7]  # continued from step 4, not 0
    assert resumed["lrs"] == {step: lr for step, lr in fsdp["lrs"].items() if step >= 4}  # the schedule too
    # The sharded checkpoint was saved after step 4 inside the run, as SLURMRequeue and ModelCheckpoint save
    # (not after fit() returned: Lightning then restores the loops one epoch off, see the session note). Resuming
    # repeats the same float operations on the same batches (SGD momentum restored from the shards), so the weights
    # equal the uninterrupted run's to float32 rounding, far below what the last 4 steps moved.
    moved = max(float((fsdp["weights"][k] - v).abs().max()) for k, v in runs["at_save"].items())
    assert moved > 1e-3
    for key, value in fsdp["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("callback", ["EMA", "SWA"])
def test_weight_averaging_refuses_sharded_training(callback):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    import callbacks.averaging as averaging
    from modules.components.errors import ConfigError

    made = averaging.EMA() if callback == "EMA" else averaging.SWA(swa_lrs=0.01)
    with pytest.raises(ConfigError, match="sharded training"):
        made.setup(SimpleNamespace(strategy=ModelParallelStrategy()), None, "fit")


def test_documented_fsdp_config_on_one_node_of_two_devices(tmp_path):
    """``--config configs/trainer/gpu.yaml --config configs/trainer/fsdp.yaml`` on 1 node x 2 devices (CPU, gloo):
    Lightning's own ``data_parallel_size: auto`` (the number of nodes, 1) stopped both ranks at start-up."""
    args = ["fit", "--config", str(CONFIGS / "trainer/gpu.yaml"), "--config", str(CONFIGS / "trainer/fsdp.yaml"),
            "--config", str(CONFIGS / "data/fashion_mnist_torchvision.yaml"),
            "--config", str(CONFIGS / "classification/debug.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
            "--data.init_args.num_workers", "0", "--data.init_args.batches", "tests.resume_script.WithIndex",
            "--trainer.callbacks+=tests.resume_script.RecordBatches", "--trainer.callbacks.folder", str(tmp_path / "b")]
    result = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # sharded: one file per rank
    # Two data-parallel ranks (not one rank's batch replicated for tensor parallelism): disjoint samples each step.
    ranks = [trained_batches(tmp_path / "b", rank)[0] for rank in (0, 1)]
    for first, second in zip(*ranks):
        assert len(first["index"]) == len(second["index"]) == 64 and not set(first["index"]) & set(second["index"])


@pytest.mark.parametrize(("nodes", "devices", "sizes", "expected"), [
    (1, 8, ("auto", 1), (8, 1)), (8, 1, ("auto", 1), (8, 1)), (4, 8, ("auto", 1), (32, 1)),
    (2, 4, ("auto", 2), (4, 2)), (2, 4, ("auto", "auto"), (8, 1)),
    (1, 4, ("auto", 3), "does not divide the 1 node(s) x 4 device(s) = 4 processes"),
    (2, 2, (2, 1), "data_parallel_size 2 x tensor_parallel_size 1 must equal the 2 node(s) x 2 device(s) = 4"),
])
def test_sharded_layout_follows_the_world_size(nodes, devices, sizes, expected):
    from modules.components.errors import ConfigError
    from modules.components.sharding import ShardedDataParallel

    strategy = ShardedDataParallel(data_parallel_size=sizes[0], tensor_parallel_size=sizes[1])
    strategy.num_nodes, strategy.parallel_devices = nodes, [torch.device("cpu")] * devices
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            strategy.layout()
    else:
        assert strategy.layout() == expected


def test_impossible_sharded_layout_is_one_line_before_launch(run_cli, tmp_path, beton_cache, capsys):
    args = cli_args(tmp_path, beton_cache, "--config", str(CONFIGS / "trainer/fsdp.yaml"), "--trainer.devices", "2",
                    "--trainer.strategy.init_args.tensor_parallel_size", "3")
    assert run_cli(args) == 2
    one_line_error(capsys, "tensor_parallel_size 3 does not divide the 1 node(s) x 2 device(s) = 2 processes")
