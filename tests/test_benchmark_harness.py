"""benchmarks/harness.py: what every benchmark's runs and ratio lines go through."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_lines(harness):
    assert harness.ratio_text("ffcv_raw", 2.314) == "ffcv_raw: 2.31x"
    assert harness.ratio_text("a", 1.0, holds=True, rule=">= 1") == "a: 1.00x (holds: >= 1)"
    assert harness.ratio_text("a", 0.5, holds=False) == "a: 0.50x (DOES NOT hold)"
    assert harness.ratio_text("a", 0.5, note="timing") == "a: 0.50x (timing)"


def test_cli_run_builds_the_configs_layers_with_overrides_last(harness, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--quick"])  # a benchmark's own flags
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, data, trainer = harness.quiet_run(
            ["trainer/cpu.yaml", "data/fashion_mnist_torchvision.yaml", "classification/resnet18.yaml"],
            ["--data.init_args.batch_size", "7", "--trainer.max_epochs", "3"])
    # only LightningCLI's "args and sys.argv" warning is the harness's to silence; others (an `srun` on PATH,
    # no GPU) depend on the machine and are not asserted on
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
    assert type(model).__name__ == "ClassificationModule" and data.hparams.batch_size == 7
    assert trainer.max_epochs == 3 and trainer.logger is None and not trainer.checkpoint_callback.save_last
    assert model.hparams.num_classes == 10  # linked from the data, not typed in the model layer
