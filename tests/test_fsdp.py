"""Sharded training (FSDP2 via Lightning's ModelParallelStrategy) on 2 CPU processes (gloo).

Lightning's FSDPStrategy (FSDP1) refuses CPU accelerators and torch's FSDP1 needs a non-CPU device; FSDP2's
``fully_shard`` runs on CPU, so the same strategy as configs/trainer/fsdp.yaml is tested here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

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
