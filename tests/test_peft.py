"""PEFT: trainable sets, frozen backbone, SSF merge, adapter identity at init, low-bit storage, task files."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from modules.components.errors import ConfigError
from modules.components.optim import OptimConfig
from modules.components.peft import (
    SSF,
    Adapter,
    AdapterConfig,
    QuantLinear,
    SideConfig,
    code_range,
    insert_adapters,
    insert_ssf,
    merge_ssf,
    pack_bits,
    task_storage_bytes,
    unpack_bits,
)
from modules.peft import PEFTModule, load_task_file, main as peft_main
from tests.conftest import cli_args

VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 8, "depth": 2}, image_size=32)
RESNET = dict(backbone="test_resnet", image_size=32)
VIT_TIMM = dict(img_size=32, patch_size=8, depth=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="PEFT method")


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build(arch: dict, method: str, **kwargs) -> PEFTModule:
    return PEFTModule(**arch, num_classes=3, method=method, **kwargs)


def _ssf_names(sites: list[str]) -> set[str]:
    return {f"backbone.{s}.ssf_{p}" for s in sites for p in ("scale", "shift")}


def _adapter_names(sites: list[str], extra: tuple[str, ...] = ()) -> set[str]:
    leaves = ("weight", "bias", *extra)
    return {f"backbone.{s}.adapter.{layer}.{leaf}" for s in sites for layer in ("down", "up") for leaf in leaves}


VIT_HEAD = {"backbone.head.weight", "backbone.head.bias"}
RESNET_HEAD = {"backbone.fc.weight", "backbone.fc.bias"}
VIT_SSF_SITES = ["patch_embed.proj", "norm"] + [
    f"blocks.{i}.{op}" for i in range(2) for op in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
]


# --- exactly the intended parameters train ---------------------------------------------------------
def test_trainable_names_vit():
    assert set(build(VIT, "linear_probe").task_parameter_names()) == VIT_HEAD
    assert set(build(VIT, "ssf").task_parameter_names()) == _ssf_names(VIT_SSF_SITES) | VIT_HEAD
    mlps = ["blocks.0.mlp", "blocks.1.mlp"]
    assert set(build(VIT, "adapter").task_parameter_names()) == _adapter_names(mlps) | VIT_HEAD
    low_bit = build(VIT, "adapter", adapter=AdapterConfig(bits=2, quant_scale="learned"))
    assert set(low_bit.task_parameter_names()) == _adapter_names(mlps, ("step_gain",)) | VIT_HEAD
    side = build(VIT, "side", side=SideConfig(dim=8, taps=2))
    expected_side = {f"side.laterals.{i}.{leaf}" for i in range(2) for leaf in ("weight", "bias")}
    expected_side |= {f"side.blocks.{i}.{layer}.{leaf}" for i in range(2) for layer in ("dwconv", "norm", "fc1", "fc2") for leaf in ("weight", "bias")}
    expected_side |= {"side.norm.weight", "side.norm.bias", "side.head.weight", "side.head.bias"}
    assert set(side.task_parameter_names()) == expected_side
    full = build(VIT, "full")
    assert set(full.task_parameter_names()) == {f"backbone.{n}" for n, _ in full.backbone.named_parameters()}


def test_trainable_names_resnet():
    model = build(RESNET, "ssf")
    bns = [n for n, m in timm.create_model("test_resnet").named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert set(model.task_parameter_names()) == _ssf_names(bns) | RESNET_HEAD  # bias-free convs fold via their BN
    blocks = ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    adapter = build(RESNET, "adapter", adapter=AdapterConfig(style="sequential"))
    assert set(adapter.task_parameter_names()) == _adapter_names(blocks) | RESNET_HEAD
    with pytest.raises(ConfigError, match="sequential"):
        build(RESNET, "adapter", adapter=AdapterConfig(style="parallel"))
    side = build(RESNET, "side", side=SideConfig(dim=8, taps=3))
    assert {n.split(".")[0] for n in side.task_parameter_names()} == {"side"}
    levels = timm.create_model("test_resnet").feature_info[-3:]
    assert [lat.in_channels for lat in side.side.laterals] == [f["num_chs"] for f in levels]  # last 3 levels


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="linear_probe"):
        build(VIT, "lora")


# --- the backbone does not move -----------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,method,kwargs",
    [
        (VIT, "ssf", {}),
        (VIT, "adapter", {"adapter": AdapterConfig(bits=1)}),
        (VIT, "side", {"side": SideConfig(dim=8, taps=2)}),
        (RESNET, "ssf", {}),
    ],
    ids=["vit-ssf", "vit-adapter1bit", "vit-side", "resnet-ssf"],
)
def test_backbone_unchanged_after_fit(tmp_path, arch, method, kwargs):
    model = build(arch, method, optim=OptimConfig(lr=1e-2, warmup_epochs=0), **kwargs)
    task = set(model.task_parameter_names())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k not in task}
    task_before = {k: v.clone() for k, v in model.state_dict().items() if k in task}
    data = TensorDataset(images(16), torch.tensor([0, 1, 2, 0] * 4))
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    after = model.state_dict()
    changed = [k for k, v in frozen_before.items() if not torch.equal(v, after[k])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"  # incl. BatchNorm running statistics
    assert any(not torch.equal(v, after[k]) for k, v in task_before.items())


# --- SSF merge ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,timm_name,timm_kwargs",
    [(VIT, "vit_tiny_patch16_224", VIT_TIMM), (RESNET, "test_resnet", {}), ({"backbone": "convnext_atto", "image_size": 32}, "convnext_atto", {})],
    ids=["vit", "resnet", "convnext"],
)
def test_ssf_merge_gives_plain_model_with_identical_logits(arch, timm_name, timm_kwargs):
    model = build(arch, "ssf", ssf_init_std=0.3).eval()  # far from identity so a wrong fold shows
    x = images()
    with torch.no_grad():
        expected = model(x)
        merged = model.merged_backbone()
        assert not any(isinstance(m, SSF) for m in merged.modules())
        plain = timm.create_model(timm_name, num_classes=3, **timm_kwargs).eval()
        plain.load_state_dict(merged.state_dict())  # strict: same architecture, same names
        assert type(plain) is type(merged)
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, SSF) for m in model.modules())  # merging a copy leaves the training model intact


def test_ssf_identity_init_is_the_unwrapped_model():
    base = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT_TIMM).eval()
    wrapped = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT_TIMM).eval()
    wrapped.load_state_dict(base.state_dict())
    insert_ssf(wrapped, exclude=("head",), init_std=0.0)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), base(x), atol=0, rtol=0)
        torch.testing.assert_close(merge_ssf(wrapped)(x), base(x), atol=0, rtol=0)
    assert not any(isinstance(m, SSF) for m in wrapped.modules())
    insert_ssf(wrapped)
    with pytest.raises(ConfigError, match="once"):
        insert_ssf(wrapped)


# --- adapters -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "timm_name,timm_kwargs,cfg",
    [
        ("vit_tiny_patch16_224", VIT_TIMM, AdapterConfig(style="parallel", scale=0.5)),
        ("vit_tiny_patch16_224", VIT_TIMM, AdapterConfig(style="sequential", dim=4)),
        ("vit_tiny_patch16_224", VIT_TIMM, AdapterConfig(bits=1)),
        ("vit_tiny_patch16_224", VIT_TIMM, AdapterConfig(bits=4, quant_scale="learned")),
        ("test_resnet", {}, AdapterConfig(style="sequential")),
    ],
    ids=["vit-parallel", "vit-sequential", "vit-1bit", "vit-4bit-learned", "resnet-sequential"],
)
def test_adapter_at_init_leaves_output_unchanged(timm_name, timm_kwargs, cfg):
    base = timm.create_model(timm_name, num_classes=3, **timm_kwargs).eval()
    adapted = timm.create_model(timm_name, num_classes=3, **timm_kwargs).eval()
    adapted.load_state_dict(base.state_dict())
    sites = insert_adapters(adapted, cfg)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), base(x), atol=0, rtol=0)
        adapter = adapted.get_submodule(sites[0]).adapter
        torch.nn.init.normal_(adapter.up.weight, std=0.5)
        assert not torch.allclose(adapted(x), base(x), atol=1e-4)  # the adapter is on the forward path


# --- low-bit weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("scale", ["computed", "learned"])
def test_low_bit_weights_lie_on_the_grid(bits, scale):
    layer = QuantLinear(64, 16, bits=bits, scale=scale)
    if layer.step_gain is not None:
        torch.nn.init.uniform_(layer.step_gain, 0.5, 1.5)
    weight = layer.quantized_weight().detach()
    step = layer.step().detach()
    levels = weight / step[:, None] - 0.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # on the (code + 0.5) * step grid
    lo, hi = code_range(bits)
    assert levels.round().min() >= lo and levels.round().max() <= hi
    assert max(len(row.unique()) for row in weight) <= 2**bits
    if bits == 1 and scale == "computed":  # binary weights = sign(w) * mean|w| per row
        expected = layer.weight.sign() * layer.weight.abs().mean(dim=1, keepdim=True)
        torch.testing.assert_close(weight, expected)
    codes, _ = layer.codes_and_step()
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).view(codes.shape), codes.long())


def test_low_bit_straight_through_gradients():
    layer = QuantLinear(8, 4, bits=1, scale="learned")
    layer(torch.randn(5, 8)).square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.step_gain.grad.abs().sum() > 0


def test_task_storage_bytes_counts_stated_bits():
    cfg = AdapterConfig(dim=8, bits=1)
    adapter = Adapter(192, cfg)
    # weights: 2 * 192*8 values at 1 bit; fp32 step per output row (8 + 192); fp32 biases (8 + 192)
    assert task_storage_bytes(adapter) == 2 * (192 * 8 // 8) + (8 + 192) * 4 + (8 + 192) * 4
    fp32 = Adapter(192, AdapterConfig(dim=8))
    assert task_storage_bytes(fp32) == (2 * 192 * 8 + 8 + 192) * 4


# --- task files -----------------------------------------------------------------------------------
@pytest.fixture
def backbone_checkpoint(tmp_path):
    """A visionlab-style checkpoint of a 5-class classifier (the pretraining run)."""
    pretrained = timm.create_model("vit_tiny_patch16_224", num_classes=5, **VIT_TIMM)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in pretrained.state_dict().items()}}, path)
    return str(path), pretrained


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("ssf", {}),
        ("adapter", {"adapter": AdapterConfig(bits=1, quant_scale="learned")}),
        ("adapter", {"adapter": AdapterConfig(bits=3, style="sequential")}),
        ("side", {"side": SideConfig(dim=8, taps=2)}),
        ("linear_probe", {}),
        ("full", {}),
    ],
    ids=["ssf", "adapter-1bit-learned", "adapter-3bit", "side", "linear_probe", "full"],
)
def test_task_file_round_trip(tmp_path, backbone_checkpoint, method, kwargs):
    ckpt, pretrained = backbone_checkpoint
    model = build(VIT, method, init_checkpoint=ckpt, **kwargs)
    assert torch.equal(model.backbone.patch_embed.proj.weight if method != "ssf" else model.backbone.patch_embed.proj.inner.weight,
                       pretrained.patch_embed.proj.weight)
    with torch.no_grad():  # stand-in for training: move every task parameter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    size = model.export_task_file(tmp_path / "task.pt")
    saved = torch.load(tmp_path / "task.pt", weights_only=True)
    if method != "full":  # only task parameters, never the 1M-parameter backbone
        assert not any(k.startswith("backbone.blocks") and "adapter" not in k and "ssf" not in k for k in saved["params"])
        assert size < 200_000
    reloaded = load_task_file(tmp_path / "task.pt")
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x), atol=1e-6, rtol=1e-6)
    if kwargs.get("adapter") and kwargs["adapter"].bits:
        bits = kwargs["adapter"].bits
        entry = next(iter(saved["quantized"].values()))
        assert entry["bits"] == bits and entry["codes"].numel() == math.ceil(math.prod(entry["shape"]) * bits / 8)


def test_task_file_needs_the_backbone(tmp_path):
    model = build(VIT, "ssf")
    model.export_task_file(tmp_path / "task.pt")
    with pytest.raises(ConfigError, match="init_checkpoint"):
        load_task_file(tmp_path / "task.pt")


# --- the CLI ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_debug_config_through_cli_then_export_and_load(tmp_path, beton_cache, run_cli, backbone_checkpoint, capsys):
    pretrained, _ = backbone_checkpoint  # same architecture as configs/peft/debug.yaml
    run = tmp_path / "run"
    assert run_cli(cli_args(run, beton_cache, "--model.init_args.init_checkpoint", pretrained, model="peft/debug.yaml")) == 0
    checkpoint = run / "checkpoints" / "last.ckpt"
    peft_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "task.pt")])
    peft_main(["load", "--task", str(tmp_path / "task.pt"), "--out", str(tmp_path / "plain.pt")])
    assert "rebuilt vit_tiny_patch16_224" in capsys.readouterr().out
    trained = PEFTModule.load_from_checkpoint(checkpoint, weights_only=False).eval()
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=5, **VIT_TIMM).eval()  # SSF merged away
    plain.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(load_task_file(tmp_path / "task.pt")(images()), trained(images()), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(plain(images()), trained(images()), atol=1e-5, rtol=1e-5)
    # a PEFT run's checkpoint also serves as a backbone checkpoint (wrapped names are unwrapped)
    again = build(VIT, "adapter", init_checkpoint=str(checkpoint))
    assert torch.equal(again.backbone.blocks[0].attn.qkv.weight, trained.backbone.blocks[0].attn.qkv.inner.weight)
