"""Each bad input ends with one line naming the problem and the fix, exit code 2, and nothing half-written."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import one_line_error as _one_line_error, cli_args
from tests.conftest import torchvision_data




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
    from modules.classification import ClassificationModule
    from modules.components.errors import ConfigError

    model = ClassificationModule("test_resnet", num_classes=5, image_size=32)
    data = torchvision_data(train_limit=64, val_limit=64, num_workers=0)
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


# --- keys, checkpoints and architectures that do not fit (end to end through the CLI) --------------------


@pytest.mark.parametrize("yaml_text, suggestion", [
    ("trainer:\n  max_epoch: 3\n", "unknown key trainer.max_epoch (did you mean trainer.max_epochs?)"),
    ("model:\n  init_args:\n    label_smothing: 0.2\n",
     "unknown key model.init_args.label_smothing (did you mean model.init_args.label_smoothing?)"),
    ("checkpoint:\n  monitr: val/loss\n", "unknown key checkpoint.monitr (did you mean checkpoint.monitor?)"),
])
def test_unknown_yaml_key_suggests_the_nearest(run_cli, tmp_path, beton_cache, capsys, yaml_text, suggestion):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml_text)
    assert run_cli(cli_args(tmp_path / "run", beton_cache, "--config", str(config))) == 2
    _one_line_error(capsys, suggestion)
    assert not (tmp_path / "run").exists()


def test_misspelt_option_is_not_expanded_to_a_longer_one(run_cli, tmp_path, beton_cache, capsys):
    # argparse would silently read --trainer.max_epoch as --trainer.max_epochs (allow_abbrev)
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.max_epoch", "3")) == 2
    _one_line_error(capsys, "did you mean trainer.max_epochs?")


def test_wrong_value_type_is_one_line(run_cli, tmp_path, beton_cache, capsys):
    assert run_cli(cli_args(tmp_path, beton_cache, "--trainer.max_epochs", "three")) == 2
    _one_line_error(capsys, "trainer.max_epochs", "three")


def _vit_checkpoint(path, **backbone_kwargs):
    """A classification-style checkpoint (``backbone.*`` keys) of a test_vit built with ``backbone_kwargs``."""
    from modules.components.backbones import create_backbone

    backbone = create_backbone("test_vit", num_classes=10, image_size=32, **backbone_kwargs)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"_class_path": "modules.classification.ClassificationModule",
                                                          "backbone": "test_vit", "backbone_kwargs": backbone_kwargs}},
               path)
    return path


def _init_from(run_cli, tmp_path, beton_cache, checkpoint, backbone_kwargs: str = "{}"):
    """A fit from ``checkpoint``; ``backbone_kwargs`` asked for explicitly win over the ones it records."""
    return run_cli(cli_args(tmp_path / "run", beton_cache, "--model.init_args.backbone", "test_vit",
                            "--model.init_args.backbone_kwargs", backbone_kwargs,
                            "--model.init_args.init_checkpoint", str(checkpoint)))


def test_init_checkpoint_of_the_same_architecture_loads(run_cli, tmp_path, beton_cache):
    assert _init_from(run_cli, tmp_path, beton_cache, _vit_checkpoint(tmp_path / "same.ckpt")) == 0


def test_init_checkpoint_brings_its_own_architecture(run_cli, tmp_path, beton_cache):
    checkpoint = _vit_checkpoint(tmp_path / "deeper.ckpt", depth=7)  # nothing asked for: the recorded 7 blocks
    assert _init_from(run_cli, tmp_path, beton_cache, checkpoint) == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["hyper_parameters"]["backbone_kwargs"]["depth"] == 7 and "backbone.blocks.6.mlp.fc1.weight" in saved["state_dict"]


def test_init_checkpoint_of_another_depth_names_the_keys(run_cli, tmp_path, beton_cache, capsys):
    checkpoint = _vit_checkpoint(tmp_path / "deeper.ckpt", depth=7)  # the model asks for 6 blocks
    assert _init_from(run_cli, tmp_path, beton_cache, checkpoint, '{"depth": 6}') == 2
    _one_line_error(capsys, str(checkpoint), "blocks.6.")
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_init_checkpoint_of_another_width_names_the_keys(run_cli, tmp_path, beton_cache, capsys):
    checkpoint = _vit_checkpoint(tmp_path / "wider.ckpt", embed_dim=96, num_heads=4)  # the model asks for 64
    assert _init_from(run_cli, tmp_path, beton_cache, checkpoint, '{"embed_dim": 64}') == 2
    _one_line_error(capsys, str(checkpoint), "another architecture", "patch_embed.proj.weight")


def test_init_checkpoint_of_another_technique(run_cli, tmp_path, beton_cache, capsys):
    """A diffusion checkpoint (DiT denoiser weights, no ``backbone.*``) given to a classifier."""
    checkpoint = tmp_path / "dit.ckpt"
    state = {"denoiser.x_embedder.proj.weight": torch.zeros(32, 3, 4, 4), "denoiser.y_embedder.weight": torch.zeros(11, 32),
             "denoiser.blocks.0.attn.qkv.weight": torch.zeros(96, 32)}
    torch.save({"state_dict": state, "hyper_parameters": {"_class_path": "modules.diffusion.DiffusionModule"}}, checkpoint)
    assert _init_from(run_cli, tmp_path, beton_cache, checkpoint) == 2
    _one_line_error(capsys, str(checkpoint))
    assert not list((tmp_path / "run").rglob("*.ckpt"))
