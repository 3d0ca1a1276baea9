"""The shared optimizer wiring: weight-decay rules per reference, layer decay, optimizer settings, base-lr scaling."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn
from torch.utils.data import DataLoader

from modules.classification import ClassificationModule
from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig, build_optimizer, global_batch_size, parameter_groups, peak_lr
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


def test_simmim_follows_its_reference_vit_tokens_exempt_mask_token_decayed():
    # SimMIM optimizer.py: no decay for 1-d, biases and model.no_weight_decay(); its ViT lists pos_embed and
    # cls_token but not the mask token (its Swin does).
    model = SimMIMModule("test_vit", num_classes=10, image_size=32, backbone_kwargs={"patch_size": 4, "depth": 1},
                         mask_patch_size=8)
    decay = _configured_decay(model)
    assert decay["backbone.cls_token"] == decay["backbone.pos_embed"] == 0.0
    assert decay["mask_token"] == decay["backbone.blocks.0.attn.qkv.weight"] == model.optim.weight_decay > 0
    tokens_rule = SimMIMModule("test_vit", num_classes=10, image_size=32, mask_patch_size=8,
                               backbone_kwargs={"patch_size": 4, "depth": 1},
                               optim=OptimConfig(weight_decay_rule="tokens"))
    assert _configured_decay(tokens_rule)["mask_token"] == 0.0  # the named option: visionlab's earlier rule


def _configured_decay(module, root: nn.Module | None = None) -> dict[str, float]:
    """Weight decay per parameter name of the optimizer the module's own configure_optimizers builds."""
    module.trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, datamodule=None, train_dataloader=None,
                                     estimated_stepping_batches=10, max_epochs=1)
    optimizer = module.configure_optimizers()["optimizer"]
    return _decay_by_name(root or module.optimizer_root(), optimizer)


def _reference_no_decay(root: nn.Module, rule: str) -> set[str]:
    """Each reference's rule, written from its source (names relative to ``root``)."""
    listed = set()
    for prefix, module in root.named_modules():
        if hasattr(module, "no_weight_decay"):
            listed |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    out = set()
    for name, p in root.named_parameters():
        if not p.requires_grad:
            continue
        if rule == "bias_norm":  # MAE pretraining: timm add_weight_decay(model, wd), skip_list=()
            exempt = len(p.shape) == 1 or name.endswith(".bias")
        elif rule == "bias_norm_listed":  # MAE fine-tuning param_groups_lrd / SimMIM set_weight_decay
            exempt = p.ndim <= 1 or name.endswith(".bias") or name in listed
        elif rule == "open_clip":  # open_clip: p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in the name; timm's
            # (1, 1, D) class token is open_clip's (D,) class_embedding, its (1, N, D) pos_embed open_clip's (N, D)
            ndim = {"cls_token": 1, "pos_embed": 2}.get(name.rsplit(".", 1)[-1], p.ndim)
            exempt = ndim < 2 or any(key in name for key in ("bn", "ln", "bias", "logit_scale"))
        else:  # DiT: AdamW(model.parameters(), weight_decay=...)
            exempt = False
        if exempt:
            out.add(name)
    return out


def test_each_technique_default_follows_its_reference_weight_decay_rule():
    from modules.clip import CLIPModule
    from modules.components.diffusion.dit import DiT
    from modules.diffusion import DiffusionModule
    from modules.mae import MAEModule

    vit = {"patch_size": 4, "depth": 1}
    optim = OptimConfig(weight_decay=0.05)
    mae = MAEModule("test_vit", num_classes=10, image_size=32, backbone_kwargs=vit, optim=optim)
    clip = CLIPModule("test_vit", 3, 32, vit, embed_dim=16, text_width=16, text_depth=1, text_heads=2,
                      vocab_size=100, optim=optim)
    diffusion = DiffusionModule(partial(DiT, patch_size=8, dim=16, depth=1, heads=2), num_classes=3, image_size=32,
                                timesteps=100, ema_decay=0, optim=optim)
    classifier = ClassificationModule("test_vit", num_classes=3, image_size=32, backbone_kwargs=vit, optim=optim)
    cases = {"bias_norm": mae, "open_clip": clip, "all": diffusion, "bias_norm_listed": classifier}
    for rule, module in cases.items():
        assert module.weight_decay_rule == rule
        decay = _configured_decay(module)
        expected = _reference_no_decay(module.optimizer_root(), rule)
        assert {n for n, wd in decay.items() if wd == 0.0} == expected, rule
        assert all(wd == 0.05 for n, wd in decay.items() if n not in expected), rule
    # the differences that matter, spelled out
    mae_decay = _configured_decay(mae)
    assert mae_decay["backbone.cls_token"] == mae_decay["decoder.mask_token"] == 0.05  # MAE pretraining decays them
    clip_decay = _configured_decay(clip)
    assert clip_decay["image_encoder.pos_embed"] == clip_decay["text_encoder.positional_embedding"] == 0.05
    assert clip_decay["image_encoder.cls_token"] == clip_decay["loss.logit_scale.log_scale"] == 0.0
    assert clip_decay["image_encoder.blocks.0.norm1.weight"] == clip_decay["text_encoder.ln_final.weight"] == 0.0
    assert set(_configured_decay(diffusion).values()) == {0.05}  # biases too: DiT's one group
    assert _configured_decay(classifier)["cls_token"] == 0.0  # MAE fine-tuning: model.no_weight_decay()
    # the named option gives visionlab's earlier rule back: every token and position embedding exempt
    earlier = MAEModule("test_vit", num_classes=10, image_size=32, backbone_kwargs=vit,
                        optim=OptimConfig(weight_decay=0.05, weight_decay_rule="tokens"))
    earlier_decay = _configured_decay(earlier)
    assert earlier_decay["backbone.cls_token"] == earlier_decay["decoder.mask_token"] == 0.0
    with pytest.raises(ConfigError, match="weight_decay_rule"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(weight_decay_rule="timm"))


def test_layer_decay_groups_also_exempt_tokens():
    model = ClassificationModule("test_vit", num_classes=3, image_size=32, backbone_kwargs={"patch_size": 4, "depth": 2},
                                 optim=OptimConfig(layer_decay=0.5, weight_decay=0.05))
    optimizer = build_optimizer(model.optimizer_root(), model.optim)
    decay = _decay_by_name(model.backbone, optimizer)
    assert decay["cls_token"] == decay["pos_embed"] == 0.0 and decay["blocks.1.mlp.fc1.weight"] == 0.05
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [0.125, 0.25, 0.5, 1.0]
    # MAE util/lr_decay.py get_layer_id_for_vit: cls_token/pos_embed/patch_embed 0, blocks.i i + 1, everything
    # else (the final norm included) num_layers = depth + 1; scale = decay ** (num_layers - layer)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.backbone.named_parameters():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = 3
        assert scale[id(param)] == 0.5 ** (3 - layer), name
    assert scale[id(model.backbone.norm.weight)] == 1.0  # timm's matcher merges it into the last block (0.5)


def test_layer_decay_keeps_timm_grouping_for_other_families():
    convnext = timm.create_model("test_convnext", num_classes=3)
    groups = parameter_groups(convnext, 0.05, layer_decay=0.5, rule="bias_norm_listed")
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    layers = group_parameters(convnext, convnext.group_matcher(coarse=False), reverse=True)  # timm's own map
    last = max(layers.values())
    for name, param in convnext.named_parameters():
        assert scale[id(param)] == 0.5 ** (last - layers[name]), name
    assert scale[id(convnext.head.fc.weight)] == 1.0 and scale[id(convnext.stem[0].weight)] < 0.5


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
