"""Each bad input ends with one line naming the problem and the fix, exit code 2, and nothing half-written."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cli_args


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("visionlab: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _no_checkpoints(root):
    return not list(root.rglob("*.ckpt"))


def test_missing_data_path(run_cli, tmp_path, beton_cache, capsys):
    code = run_cli(cli_args(tmp_path, beton_cache, "--data.init_args.source", str(tmp_path / "nowhere")))
    assert code == 2
    _one_line_error(capsys, "does not exist", "data.source")


def test_folder_without_images(run_cli, tmp_path, beton_cache, capsys):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    (empty / "dog" / "notes.txt").write_text("not an image")
    cache = tmp_path / "cache"
    code = run_cli(cli_args(tmp_path, cache, "--data.init_args.source", str(empty)))
    assert code == 2
    _one_line_error(capsys, "no images", "one sub-folder of images per class")
    assert not list(cache.rglob("*.beton*")) and _no_checkpoints(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_beton(run_cli, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    assert run_cli(cli_args(tmp_path / "ok", cache, "--trainer.fast_dev_run", "true")) == 0
    train = next(cache.rglob("train.beton"))
    data = train.read_bytes()
    damaged = data[: len(data) // 2] if damage == "truncate" else b"\x07" * 4096
    train.write_bytes(damaged)
    capsys.readouterr()
    code = run_cli(cli_args(tmp_path / "bad", cache))
    assert code == 2
    _one_line_error(capsys, "corrupt or truncated", "delete")
    assert train.read_bytes() == damaged  # never silently rewritten or touched
    assert _no_checkpoints(tmp_path / "bad")


def test_checkpoint_for_other_class_count(run_cli, tmp_path, beton_cache, capsys):
    assert run_cli(cli_args(tmp_path, beton_cache)) == 0
    capsys.readouterr()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    code = run_cli(cli_args(tmp_path / "v", beton_cache, "--data.init_args.classes", "[0, 1, 2]",
                            "--ckpt_path", str(ckpt), command="validate"))
    assert code == 2
    _one_line_error(capsys, "10 classes", "has 3")


def test_model_and_data_class_counts_disagree(tmp_path, beton_cache):
    import lightning.pytorch as pl

    from datamodules.torchvision_datamodule import TorchvisionDataModule
    from modules.classification import ClassificationModule
    from modules.components.errors import ConfigError

    model = ClassificationModule("test_resnet", num_classes=5, image_size=32)
    data = TorchvisionDataModule(train_limit=64, val_limit=64, num_workers=0)
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="5 classes but the data has 10"):
        trainer.fit(model, data)


def test_unknown_timm_model(run_cli, tmp_path, beton_cache, capsys):
    code = run_cli(cli_args(tmp_path, beton_cache, "--model.init_args.backbone", "resnet18x"))
    assert code == 2
    _one_line_error(capsys, "unknown timm model 'resnet18x'", "did you mean")


def test_nan_loss(run_cli, tmp_path, beton_cache, capsys):
    code = run_cli(cli_args(tmp_path, beton_cache, "--model.init_args.optim.lr", "1e30",
                            "--trainer.limit_train_batches", "4"))
    assert code == 2
    _one_line_error(capsys, "training loss is", "optim.lr")
    assert _no_checkpoints(tmp_path)
