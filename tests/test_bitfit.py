"""BitFit: exactly the backbone's biases (norms' included) and the head train, merge is the trained backbone, task files."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch.utils.data import DataLoader

from app.cli import VisionlabCLI
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig
from modules.components.peft.methods import BitFit
from modules.peft import PEFTModule, load_task_file
from tests.conftest import CONFIGS, NamedTensors, cli_args

VIT_TIMM = dict(img_size=32, patch_size=8, depth=2)
VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 8, "depth": 2}, image_size=32)
RESNET = dict(backbone="test_resnet", image_size=32)
HEADS = {"vit_tiny_patch16_224": "head", "test_resnet": "fc"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="PEFT method")


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def expected_trainable(timm_name: str, **timm_kwargs) -> set[str]:
    """The biases + head of a fresh timm model, named as in a PEFTModule (independent of ``is_bias``)."""
    head = HEADS[timm_name]
    names = {n for n, _ in timm.create_model(timm_name, num_classes=3, **timm_kwargs).named_parameters()}
    return {f"backbone.{n}" for n in names if n.endswith(".bias") or n.startswith(f"{head}.")}


def move_task_parameters(model: PEFTModule) -> None:
    with torch.no_grad():  # stand-in for training: every trained tensor away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def test_trainable_names_are_the_biases_and_the_head():
    vit = PEFTModule(**VIT, num_classes=3, method=BitFit())
    trainable = set(vit.task_parameter_names())
    assert trainable == expected_trainable("vit_tiny_patch16_224", **VIT_TIMM)
    # by hand: patch_embed.proj, norm, 2 blocks x (norm1, qkv, proj, norm2, fc1, fc2) biases, head weight + bias
    assert len(trainable) == 2 + 2 * 6 + 2
    assert {"backbone.blocks.0.norm1.bias", "backbone.norm.bias"} <= trainable  # norms' biases count
    assert "backbone.blocks.0.norm1.weight" not in trainable and "backbone.pos_embed" not in trainable
    # floats: 192 (patch) + 192 (norm) + 2 x (192 + 576 + 192 + 192 + 768 + 192) + head 3 x 192 + 3
    assert vit.task_bytes() == (192 + 192 + 2 * 2112 + 3 * 192 + 3) * 4
    resnet = PEFTModule(**RESNET, num_classes=3, method=BitFit())  # bias-free convs: the BatchNorm biases train
    assert set(resnet.task_parameter_names()) == expected_trainable("test_resnet")
    assert any(".bn1.bias" in n for n in resnet.task_parameter_names())


def test_a_backbone_without_biases_is_refused():
    no_bias = dict(qkv_bias=False, proj_bias=False, norm_layer="rmsnorm", pre_norm=True)  # only head.bias is left
    with pytest.raises(ConfigError, match="BitFit trains bias terms, but VisionTransformer has none"):
        PEFTModule(**{**VIT, "backbone_kwargs": {**VIT["backbone_kwargs"], **no_bias}}, num_classes=3, method=BitFit())


# timm zero-initialises each residual branch's last BatchNorm scale, which would leave the earlier biases of a
# random ResNet's blocks without gradient; a pretrained one has no such zeros
@pytest.mark.parametrize("arch", [VIT, dict(RESNET, backbone_kwargs={"zero_init_last": False})], ids=["vit", "resnet"])
def test_one_optimizer_step_moves_only_the_biases_and_the_head(tmp_path, arch):
    model = PEFTModule(**arch, num_classes=3, method=BitFit(), optim=OptimConfig(lr=1e-2, warmup_epochs=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(NamedTensors(images(8), torch.tensor([0, 1, 2, 0] * 2)), batch_size=8))
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == set(model.task_parameter_names())  # every bias moved; no weight, no BatchNorm statistic


def test_merge_is_a_plain_timm_model_with_the_same_output():
    model = PEFTModule(**VIT, num_classes=3, method=BitFit())
    move_task_parameters(model)
    model.eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        merged = model.merged_backbone()
        assert not merged.training and merged is not model.backbone
        plain = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT_TIMM).eval()
        untuned = plain(x)
        plain.load_state_dict(merged.state_dict())  # strict: the plain architecture, same names
        torch.testing.assert_close(plain(x), expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(untuned, expected, atol=1e-3)
        merged.blocks[0].attn.qkv.bias.add_(1.0)  # a copy: the training model is untouched
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


@pytest.fixture
def backbone_checkpoint(tmp_path):
    """A visionlab-style checkpoint of a 5-class ViT (the pretraining run)."""
    pretrained = timm.create_model("vit_tiny_patch16_224", num_classes=5, **VIT_TIMM)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in pretrained.state_dict().items()}}, path)
    return str(path)


def test_task_file_holds_only_biases_and_head_and_restores_the_outputs(tmp_path, backbone_checkpoint):
    model = PEFTModule(**VIT, num_classes=3, method=BitFit(), init_checkpoint=backbone_checkpoint)
    untuned = PEFTModule(**VIT, num_classes=3, method=BitFit(), init_checkpoint=backbone_checkpoint).eval()
    move_task_parameters(model)
    model.export_task_file(tmp_path / "task.pt")
    saved = torch.load(tmp_path / "task.pt", weights_only=True)
    assert set(saved["params"]) == set(model.task_parameter_names()) and not saved["quantized"]
    reloaded = load_task_file(tmp_path / "task.pt")
    assert type(reloaded.method) is BitFit
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x), atol=1e-6, rtol=1e-6)
        untuned.backbone.head.load_state_dict(model.backbone.head.state_dict())  # same head: the biases matter
        assert not torch.allclose(untuned(x), model(x), atol=1e-3)


def test_bitfit_yaml_on_the_debug_config_fits(tmp_path, beton_cache, run_cli):
    run = tmp_path / "run"
    args = cli_args(run, beton_cache, "--config", str(CONFIGS / "peft/bitfit.yaml"), "--trainer.default_root_dir", str(run),
                    "--trainer.fast_dev_run", "true", model="peft/debug.yaml")
    cli = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args[1:])
    assert type(cli.model.method) is BitFit  # the overlay replaces the debug config's SSF
    assert set(cli.model.task_parameter_names()) == expected_trainable("vit_tiny_patch16_224", **VIT_TIMM)
    assert run_cli(args) == 0
