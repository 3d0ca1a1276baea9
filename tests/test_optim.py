"""The shared optimizer wiring: no weight decay on tokens, optimizer settings, base-lr scaling by the global batch."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from modules.classification import ClassificationModule
from modules.components.optim import OptimConfig, build_optimizer, global_batch_size, peak_lr
from modules.simmim import SimMIMModule
from tests.conftest import NamedTensors


def _decay_by_name(model: nn.Module, optimizer) -> dict[str, float]:
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {name: decay[id(p)] for name, p in model.named_parameters() if id(p) in decay}


class _Wrapper(nn.Module):
    """A LightningModule-like root: the timm backbone under a prefix, plus a token of its own."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(8, 8)


def test_tokens_and_model_listed_parameters_get_no_weight_decay_under_a_prefix():
    vit = timm.create_model("test_vit", img_size=32, patch_size=4, depth=1, reg_tokens=2, num_classes=3)
    beit = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             num_classes=3)  # per-block relative position bias tables (2-d), listed by Beit itself
    for backbone in (vit, beit):
        root = _Wrapper(backbone)
        decay = _decay_by_name(root, build_optimizer(root, OptimConfig(name="adamw", weight_decay=0.05)))
        exempt = {n for n in decay if n.rsplit(".", 1)[-1] in {"cls_token", "reg_token", "pos_embed", "mask_token"}
                  or "relative_position_bias_table" in n}
        assert {"mask_token", "backbone.cls_token"} <= exempt
        assert ("backbone.reg_token" in exempt) == (backbone is vit)
        assert any("relative_position_bias_table" in n for n in exempt) == (backbone is beit)
        for name, value in decay.items():
            param = dict(root.named_parameters())[name]
            expected = 0.0 if name in exempt or param.ndim <= 1 else 0.05
            assert value == expected, name
        assert decay["proj.weight"] == 0.05 and decay["backbone.blocks.0.mlp.fc1.weight"] == 0.05


def test_simmim_module_mask_token_and_vit_tokens_not_decayed():
    model = SimMIMModule("test_vit", num_classes=10, image_size=32, backbone_kwargs={"patch_size": 4, "depth": 1},
                         mask_patch_size=8)
    decay = _decay_by_name(model, build_optimizer(model.optimizer_root(), model.optim))
    assert decay["mask_token"] == decay["backbone.cls_token"] == decay["backbone.pos_embed"] == 0.0
    assert decay["backbone.blocks.0.attn.qkv.weight"] == model.optim.weight_decay > 0


def test_layer_decay_groups_also_exempt_tokens():
    model = ClassificationModule("test_vit", num_classes=3, image_size=32, backbone_kwargs={"patch_size": 4, "depth": 2},
                                 optim=OptimConfig(layer_decay=0.5, weight_decay=0.05))
    optimizer = build_optimizer(model.optimizer_root(), model.optim)
    decay = _decay_by_name(model.backbone, optimizer)
    assert decay["cls_token"] == decay["pos_embed"] == 0.0 and decay["blocks.1.mlp.fc1.weight"] == 0.05
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [0.125, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("name", ["lars", "sgdw", "rmsprop", "sgd", "momentum", "sgdp"])
def test_momentum_reaches_every_optimizer_that_takes_it(name):
    optimizer = build_optimizer(nn.Linear(4, 2), OptimConfig(name=name, lr=0.1, momentum=0.5))
    assert all(group["momentum"] == 0.5 for group in optimizer.param_groups)


def test_betas_and_eps_reach_adamw_and_default_to_the_optimizer_own():
    optimizer = build_optimizer(nn.Linear(4, 2), OptimConfig(name="adamw", betas=(0.9, 0.95), eps=1e-6))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["eps"] == 1e-6
    default = build_optimizer(nn.Linear(4, 2), OptimConfig(name="adamw"))
    assert default.param_groups[0]["betas"] == (0.9, 0.999) and default.param_groups[0]["eps"] == 1e-8
    lion = build_optimizer(nn.Linear(4, 2), OptimConfig(name="lion", eps=1e-6))  # no eps: dropped, not an error
    assert lion.param_groups[0]["betas"] == (0.9, 0.99)


def test_base_lr_rule_by_hand():
    assert global_batch_size(64, world_size=8, accumulate_grad_batches=2) == 1024
    mae = OptimConfig(lr=1.5e-4, lr_base_batch=256)
    assert peak_lr(mae, 4096) == pytest.approx(2.4e-3)  # MAE ViT-B: blr 1.5e-4 x 4096 / 256
    assert peak_lr(OptimConfig(lr=1.5e-4), 4096) == 1.5e-4  # absolute lr (the default) is untouched
    with pytest.raises(ValueError):
        peak_lr(mae, None)


def _model(optim: OptimConfig) -> ClassificationModule:
    return ClassificationModule("test_vit", num_classes=3, image_size=32, backbone_kwargs={"patch_size": 8, "depth": 1},
                                optim=optim)


def test_configure_optimizers_scales_lr_by_batch_devices_nodes_and_accumulation():
    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-3, lr_base_batch=256, warmup_epochs=0, min_lr_ratio=0.1)
    model = _model(optim)
    data = NamedTensors(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(model, DataLoader(data, batch_size=4))  # no datamodule: the train loader's batch size
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 4 * 1 * 2 / 256)

    # 2 nodes x 4 devices, batch 32 from the datamodule, accumulation 4: 1024 samples per step.
    model = _model(optim)
    model.trainer = SimpleNamespace(world_size=8, accumulate_grad_batches=4, datamodule=SimpleNamespace(batch_size=32),
                                    train_dataloader=None, estimated_stepping_batches=100, max_epochs=10)
    config = model.configure_optimizers()
    expected = 1e-3 * 32 * 8 * 4 / 256
    assert config["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(expected)
    assert config["lr_scheduler"]["scheduler"].lr_min == pytest.approx(0.1 * expected)
    model = _model(OptimConfig(lr=1e-3, warmup_epochs=0))
    model.trainer = SimpleNamespace(world_size=8, accumulate_grad_batches=4, datamodule=None, train_dataloader=None,
                                    estimated_stepping_batches=100, max_epochs=10)
    assert model.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == 1e-3  # absolute lr
