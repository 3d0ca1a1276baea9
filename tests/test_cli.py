"""The visionlab CLI end to end: fast_dev_run, a short real fit, config composition/links, print_config, resume."""

from __future__ import annotations

from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
import yaml

from app.cli import VisionlabCLI
from tests.conftest import CONFIGS, cli_args


def _build(tmp_path, beton_cache, *extra):
    args = cli_args(tmp_path, beton_cache, *extra)[1:]  # no subcommand with run=False
    return VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, run=False, args=args)


def test_fast_dev_run(run_cli, tmp_path, beton_cache):
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.fast_dev_run", "true")) == 0


def test_links_put_data_classes_and_size_into_model(tmp_path, beton_cache):
    cli = _build(tmp_path, beton_cache, "--data.init_args.classes", "[1, 4, 8]", "--data.init_args.image_size", "24")
    assert cli.datamodule.num_classes == 3
    assert cli.model.num_classes == 3 and cli.model.image_size == 24
    assert cli.model.backbone.get_classifier().out_features == 3
    # The checkpoint callback is configured from YAML and writes under default_root_dir.
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/acc1" and checkpoint.dirpath == str(tmp_path / "checkpoints")
    # last.ckpt also on a timer inside epochs (bounded loss on a crash); written atomically.
    assert checkpoint.last_train_time_interval == timedelta(minutes=10) and checkpoint.write_last
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"


def test_configs_compose_later_files_win(tmp_path, beton_cache):
    cli = _build(tmp_path, beton_cache)
    assert cli.model.hparams.backbone == "test_resnet"  # from classification/debug.yaml
    assert cli.datamodule.batch_size == 64  # debug.yaml overrides fashion_mnist.yaml's 128
    assert cli.datamodule.image_size == 32  # from fashion_mnist.yaml
    assert cli.trainer.max_epochs == 1  # from trainer/debug.yaml


def test_print_config_round_trips(run_cli, tmp_path, beton_cache, capsys):
    assert run_cli(cli_args(tmp_path, beton_cache, "--print_config")) == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "modules.classification.ClassificationModule"
    assert config["data"]["init_args"]["source"] == "fashion_mnist"
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert run_cli(["fit", "--config", str(saved), "--print_config"]) == 0
    assert capsys.readouterr().out == printed
    assert run_cli(["fit", "--config", str(saved), "--trainer.fast_dev_run", "true"]) == 0


@pytest.mark.slow
def test_short_real_fit_learns_and_leaves_logs_and_checkpoints(run_cli, tmp_path, beton_cache, capsys):
    args = cli_args(tmp_path, beton_cache, "--trainer.limit_train_batches", "null", "--trainer.limit_val_batches", "null",
                    "--trainer.max_epochs", "2", "--data.init_args.train_limit", "4096", "--data.init_args.val_limit", "1000")
    assert run_cli(args) == 0
    best = [line for line in capsys.readouterr().out.splitlines() if line.startswith("visionlab: best val/acc1")]
    accuracy = float(best[0].split("=")[1].split()[0])
    assert accuracy > 0.5, f"val/acc1 {accuracy} is barely above chance (0.1)"
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_resume_from_last_continues_step_count_and_optimizer(run_cli, tmp_path, beton_cache):
    assert run_cli(cli_args(tmp_path, beton_cache)) == 0
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2 and first["epoch"] == 0
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.max_epochs", "2", "--ckpt_path", "last")) == 0
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 4 and second["epoch"] > first["epoch"]
    momentum = second["optimizer_states"][0]["state"]
    assert momentum, "optimizer state was not restored/saved"


def test_last_checkpoint_tracks_latest_step_even_without_improvement(run_cli, tmp_path, beton_cache):
    # A huge learning rate makes val/acc1 stall early; last.ckpt must still follow every epoch.
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.max_epochs", "4", "--model.init_args.optim.lr", "5")) == 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 8
    assert len(list((tmp_path / "checkpoints").glob("epoch*.ckpt"))) == 1  # top-1 kept


def test_tools_run_through_the_one_cli_path_without_touching_sys_argv(run_cli, tmp_path, capsys, monkeypatch):
    """``visionlab <tool>`` passes its arguments to the tool (no sys.argv swap); user errors: one line, exit 2."""
    monkeypatch.setattr("sys.argv", ["sentinel"])
    missing = tmp_path / "missing.ckpt"
    assert run_cli(["sample", "--checkpoint", str(missing), "--out", str(tmp_path / "out"), "--per-class", "0"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error:" in line]  # the CLI's one error path, one prefix
    assert len(errors) == 1 and errors[0].startswith("visionlab: error:") and "--per-class 0 must be at least 1" in errors[0]
    import sys

    assert sys.argv == ["sentinel"] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers, timeout", [(["trainer/ddp_cpu.yaml"], timedelta(minutes=5)),
                                             (["trainer/cpu.yaml", "trainer/ddp.yaml"], timedelta(minutes=10))])
def test_ddp_trainer_layers_bound_the_process_group_timeout(tmp_path, beton_cache, layers, timeout):
    from lightning.pytorch.strategies import DDPStrategy

    extra = [arg for layer in layers for arg in ("--config", str(CONFIGS / layer))]
    cli = _build(tmp_path, beton_cache, *extra)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.config["trainer"]["strategy"]["init_args"]["timeout"] == timeout


def test_one_default_tensorboard_logger_follows_the_root_dir(tmp_path, beton_cache):
    from lightning.pytorch.loggers import TensorBoardLogger

    cli = _build(tmp_path, beton_cache)  # no config names a logger
    logger = cli.trainer.logger
    assert isinstance(logger, TensorBoardLogger)
    assert logger.save_dir == str(tmp_path) and logger.name == "tensorboard"
    disabled = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                            run=False, args=cli_args(tmp_path, beton_cache, "--trainer.logger", "false")[1:])
    assert disabled.trainer.logger is None
    for config in CONFIGS.glob("*/*.yaml"):  # the block is defined once, in app/cli.py
        assert "TensorBoardLogger" not in config.read_text(), config
