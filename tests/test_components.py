"""Shared components: backbone factory, optimizer parameter groups, warmup-cosine schedule, checkpoint reading."""

from __future__ import annotations

import math

import pytest
import torch

from modules.components.backbones import create_backbone, load_state_dict_strict
from modules.components.checkpoints import backbone_state_dict
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig, build_optimizer, build_scheduler


def test_create_backbone_passes_img_size_only_where_accepted():
    vit = create_backbone("test_vit", num_classes=7, image_size=32, patch_size=4)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    cnn = create_backbone("test_resnet", num_classes=0, image_size=32)
    assert cnn(torch.randn(2, 3, 32, 32)).ndim == 2  # pooled features, no head


def test_unknown_backbone_suggests_names():
    with pytest.raises(ConfigError, match="did you mean.*resnet18"):
        create_backbone("resnet18x")


def test_no_weight_decay_on_biases_and_norms():
    model = create_backbone("test_resnet", num_classes=3)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.ndim > 1 and "bn" not in name), name


def test_frozen_parameters_are_not_optimised():
    model = create_backbone("test_resnet", num_classes=3)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    optimizer = build_optimizer(model, OptimConfig())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.get_classifier().parameters())


@pytest.mark.parametrize("name", ["sgd", "adamw", "lion"])
def test_optimizers_by_name(name):
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=0.1))
    assert type(optimizer).__name__.lower().startswith(name[:3])


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_epochs=1, min_lr_ratio=0.0, warmup_lr_ratio=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, total_steps=110, steps_per_epoch=10)
    lrs = []
    for step in range(110):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.0) and lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)  # peak after 10 warmup steps
    assert lrs[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_backbone_state_dict_and_strict_load(tmp_path):
    model = create_backbone("test_resnet", num_classes=3)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "a.ckpt")
    state = backbone_state_dict(tmp_path / "a.ckpt")
    other = create_backbone("test_resnet", num_classes=3)
    load_state_dict_strict(other, state, "a.ckpt")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    state.pop("fc.weight")
    with pytest.raises(ConfigError, match="missing.*fc.weight"):
        load_state_dict_strict(other, state, "a.ckpt")
    with pytest.raises(ConfigError, match="does not exist"):
        backbone_state_dict(tmp_path / "none.ckpt")
