"""PEFT: method objects, trainable sets, frozen backbone, SSF sites and merge, adapters, low-bit weights, task files."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from timm.layers import SEModule, StdConv2d
from torch import nn
from torch.utils.data import DataLoader

from app.cli import VisionlabCLI
from app.peft_tool import main as peft_main
from modules.components.errors import ConfigError
from modules.components.peft.low_bit import (
    NormalQuantile,
    QuantLinear,
    UniformGrid,
    normal_codebook,
    pack_bits,
    relative_error,
    task_storage_bytes,
    unpack_bits,
)
from modules.components.optim import OptimConfig
from modules.components.peft.layers import SSF, Adapter, AdapterConfig, AdaptFormerBlock, insert_ssf, merge_ssf
from modules.components.peft.methods import (AdapterTuning, BitFit, FullFineTune, LinearProbe, ParallelPlacement, SequentialPlacement,
                                             SideTuning, SSFTuning, build_method)
from modules.peft import PEFTModule, load_task_file
from tests.conftest import CONFIGS, NamedTensors, cli_args

VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 8, "depth": 2}, image_size=32)
RESNET = dict(backbone="test_resnet", image_size=32)
VIT_TIMM = dict(img_size=32, patch_size=8, depth=2)
PHI_INV_3_4 = 0.6744897501960817  # Phi^-1(0.75): the 1-bit levels of the paper's normal codebook


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="PEFT method")


def images(n: int = 4, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


def build(arch: dict, method, **kwargs) -> PEFTModule:
    return PEFTModule(**arch, num_classes=3, method=method, **kwargs)


def _ssf_names(sites: list[str]) -> set[str]:
    return {f"backbone.{s}.ssf_{p}" for s in sites for p in ("scale", "shift")}


def _adapter_names(sites: list[str], extra: tuple[str, ...] = (), leaves: tuple[str, ...] = ("weight", "bias")) -> set[str]:
    return {f"backbone.{s}.adapter.{layer}.{leaf}" for s in sites for layer in ("down", "up") for leaf in (*leaves, *extra)}


VIT_HEAD = {"backbone.head.weight", "backbone.head.bias"}
RESNET_HEAD = {"backbone.fc.weight", "backbone.fc.bias"}
VIT_SSF_SITES = ["patch_embed.proj", "norm"] + [
    f"blocks.{i}.{op}" for i in range(2) for op in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
]


# --- method objects: exactly the intended parameters train -----------------------------------------
def test_trainable_names_vit():
    assert set(build(VIT, LinearProbe()).task_parameter_names()) == VIT_HEAD
    assert set(build(VIT, SSFTuning()).task_parameter_names()) == _ssf_names(VIT_SSF_SITES) | VIT_HEAD
    blocks = ["blocks.0", "blocks.1"]  # AdaptFormer: one adapter per block, beside the MLP branch
    assert set(build(VIT, AdapterTuning()).task_parameter_names()) == _adapter_names(blocks) | VIT_HEAD
    low_bit = build(VIT, AdapterTuning(bias=False, quantizer=NormalQuantile(1)))
    assert set(low_bit.task_parameter_names()) == _adapter_names(blocks, leaves=("weight",)) | VIT_HEAD
    uniform = build(VIT, AdapterTuning(quantizer=UniformGrid(2, learned_step=True)))
    assert set(uniform.task_parameter_names()) == _adapter_names(blocks, ("step_gain",)) | VIT_HEAD
    side = build(VIT, SideTuning(dim=8, taps=2))
    expected_side = {f"side.laterals.{i}.{leaf}" for i in range(2) for leaf in ("weight", "bias")}
    expected_side |= {f"side.blocks.{i}.{layer}.{leaf}" for i in range(2) for layer in ("dwconv", "norm", "fc1", "fc2") for leaf in ("weight", "bias")}
    expected_side |= {"side.norm.weight", "side.norm.bias", "side.head.weight", "side.head.bias"}
    assert set(side.task_parameter_names()) == expected_side
    full = build(VIT, FullFineTune())
    assert set(full.task_parameter_names()) == {f"backbone.{n}" for n, _ in full.backbone.named_parameters()}


def test_trainable_names_resnet():
    model = build(RESNET, SSFTuning())
    bns = [n for n, m in timm.create_model("test_resnet").named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert set(model.task_parameter_names()) == _ssf_names(bns) | RESNET_HEAD  # bias-free convs feed their BN's SSF
    blocks = ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    adapter = build(RESNET, AdapterTuning(placement=SequentialPlacement()))
    assert set(adapter.task_parameter_names()) == _adapter_names(blocks) | RESNET_HEAD
    with pytest.raises(ConfigError, match="SequentialPlacement"):
        build(RESNET, AdapterTuning(placement=ParallelPlacement()))
    side = build(RESNET, SideTuning(dim=8, taps=3))
    assert {n.split(".")[0] for n in side.task_parameter_names()} == {"side"}
    levels = timm.create_model("test_resnet").feature_info[-3:]
    assert [lat.in_channels for lat in side.side.laterals] == [f["num_chs"] for f in levels]  # last 3 levels


def test_methods_rebuild_from_their_spec_and_unknown_ones_are_refused():
    method = AdapterTuning(dim=4, bias=False, placement=SequentialPlacement(), quantizer=UniformGrid(3, learned_step=True))
    again = build_method(method.record())
    assert type(again) is AdapterTuning and again.record() == method.record()
    assert type(again.quantizer) is UniformGrid and again.quantizer.learned_step
    assert type(again.placement) is SequentialPlacement and type(AdapterTuning().placement) is ParallelPlacement
    with pytest.raises(ConfigError, match="placement cannot be a UniformGrid: it takes AdapterPlacement"):  # its own kind
        build_method({**method.record(), "init_args": {"placement": {"class_path": "modules.components.peft.low_bit.UniformGrid"}}})
    with pytest.raises(ConfigError, match="dim cannot be a SequentialPlacement: it takes int"):
        build_method({**method.record(), "init_args": {"dim": {"class_path": "modules.components.peft.methods.SequentialPlacement"}}})
    model = build(VIT, method.record())  # a checkpoint's hyper-parameters hold the spec, never the object
    assert model.hparams["method"] == method.record()
    with pytest.raises(ConfigError, match="outside visionlab"):
        build_method({"class_path": "os.system", "init_args": {"command": "true"}})
    with pytest.raises(ConfigError, match="class_path"):
        build_method("ssf")


def test_frozen_backbone_stays_in_eval_while_adapters_follow_the_mode():
    model = build(VIT, AdapterTuning()).train()
    block = model.backbone.blocks[0]
    assert block.adapter.training and block.adapter.dropout.training  # the papers' adapter dropout is active
    assert not block.inner.norm1.training and not block.inner.attn.training and not block.inner.drop_path2.training
    assert not model.eval().backbone.blocks[0].adapter.dropout.training


# --- the backbone does not move -----------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,method",
    [
        (VIT, SSFTuning()),
        (VIT, AdapterTuning(bias=False, quantizer=NormalQuantile(1))),
        (VIT, SideTuning(dim=8, taps=2)),
        (RESNET, SSFTuning()),
    ],
    ids=["vit-ssf", "vit-adapter1bit", "vit-side", "resnet-ssf"],
)
def test_backbone_unchanged_after_fit(tmp_path, arch, method):
    model = build(arch, method, optim=OptimConfig(lr=1e-2, warmup_epochs=0))
    task = set(model.task_parameter_names())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k not in task}
    task_before = {k: v.clone() for k, v in model.state_dict().items() if k in task}
    data = NamedTensors(images(16), torch.tensor([0, 1, 2, 0] * 4))
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    after = model.state_dict()
    changed = [k for k, v in frozen_before.items() if not torch.equal(v, after[k])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"  # incl. BatchNorm running statistics
    assert any(not torch.equal(v, after[k]) for k, v in task_before.items())


# --- SSF sites and merge --------------------------------------------------------------------------
def test_ssf_sites_cover_bias_free_linears_and_batchnorm_act():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, qkv_bias=False, **VIT_TIMM)
    sites = insert_ssf(vit, exclude=("head",), example=images(1))
    assert "blocks.0.attn.qkv" in sites and "blocks.1.attn.qkv" in sites  # bias-free qkv: SSF as in the reference
    effnet = timm.create_model("test_efficientnet", num_classes=3)
    convs_into_bn = {"conv_stem", "blocks.0.0.conv", "conv_head"}
    sites = insert_ssf(effnet, exclude=("classifier",), example=images(1))
    assert {"bn1.drop", "blocks.0.0.bn1.drop", "bn2.drop"} <= set(sites)  # BatchNormAct2d: after the affine
    assert not convs_into_bn & set(sites)  # covered by their BN's SSF
    main_path = [s for s in sites if ".se." not in s]
    assert len(main_path) > len(sites) / 2


def test_ssf_refuses_a_model_whose_only_sites_are_squeeze_excitation():
    toy = nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.ReLU(), SEModule(8), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ConfigError, match="squeeze-excitation"):
        insert_ssf(toy, example=images(1))


@pytest.mark.parametrize(
    "timm_name,timm_kwargs,plain_kwargs",
    [
        ("vit_tiny_patch16_224", dict(VIT_TIMM, qkv_bias=False), dict(VIT_TIMM, qkv_bias=True)),  # merge adds qkv biases
        ("test_resnet", {}, {}),
        ("test_efficientnet", {}, {}),
        ("test_convnext", {}, {}),
    ],
    ids=["vit-qkv-bias-free", "resnet", "efficientnet", "convnext"],
)
def test_ssf_merge_gives_plain_model_with_identical_logits(timm_name, timm_kwargs, plain_kwargs):
    model = PEFTModule(backbone=timm_name, backbone_kwargs=timm_kwargs, image_size=32, num_classes=3,
                       method=SSFTuning(init_std=0.3)).double().eval()  # far from identity so a wrong fold shows
    x = images(dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        merged = model.merged_backbone()
        assert not any(isinstance(m, SSF) for m in merged.modules())
        plain = timm.create_model(timm_name, num_classes=3, **plain_kwargs).double().eval()
        plain.load_state_dict(merged.state_dict())  # strict: a plain timm architecture, same names
        assert type(plain) is type(merged)
        # float64: eps 2.2e-16 times reduction lengths of ~1e3 and a few dozen layers stays far below 1e-9
        torch.testing.assert_close(plain(x), expected, atol=1e-9, rtol=1e-9)
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
    "timm_name,timm_kwargs,placement,cfg",
    [
        ("vit_tiny_patch16_224", VIT_TIMM, ParallelPlacement(), AdapterConfig(scale=0.5)),
        ("vit_tiny_patch16_224", VIT_TIMM, SequentialPlacement(), AdapterConfig(dim=4)),
        ("test_convnext", {}, ParallelPlacement(), AdapterConfig()),
        ("test_resnet", {}, SequentialPlacement(), AdapterConfig()),
    ],
    ids=["vit-parallel", "vit-sequential", "convnext-parallel", "resnet-sequential"],
)
def test_fp32_adapter_at_init_leaves_output_unchanged(timm_name, timm_kwargs, placement, cfg):
    base = timm.create_model(timm_name, num_classes=3, **timm_kwargs).eval()
    adapted = timm.create_model(timm_name, num_classes=3, **timm_kwargs).eval()
    adapted.load_state_dict(base.state_dict())
    sites = placement.insert(adapted, cfg, images())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), base(x), atol=0, rtol=0)
        adapter = adapted.get_submodule(sites[0]).adapter
        torch.nn.init.normal_(adapter.up.weight, std=0.5)
        assert not torch.equal(adapted(x), base(x))  # the adapter is on the forward path (ConvNeXt: times layer scale 1e-6)


def test_adaptformer_adapter_reads_the_residual_stream_beside_the_mlp():
    block = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT_TIMM).blocks[0].eval()
    cfg = AdapterConfig(dim=4, scale=0.1)
    wrapped = AdaptFormerBlock(block, Adapter(192, cfg)).eval()
    torch.nn.init.normal_(wrapped.adapter.up.weight, std=0.5)
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        mid = x + block.attn(block.norm1(x))  # the stream that feeds norm2 (no layer scale / drop path here)
        adapter = wrapped.adapter
        by_hand = mid + block.mlp(block.norm2(mid)) + 0.1 * adapter.up(torch.relu(adapter.down(mid)))
        torch.testing.assert_close(wrapped(x), by_hand, atol=1e-5, rtol=1e-5)


def test_sequential_adapters_after_efficientnet_family_blocks_by_hand():
    """MobileNetV2/EfficientNet blocks have no MLP: one sequential 1x1 adapter after every block, y + s * up(relu(down(y)))."""
    base = timm.create_model("test_efficientnet", num_classes=3).eval()
    blocks = [f"blocks.{i}.{j}" for i, stage in enumerate(base.blocks) for j in range(len(stage))]
    model = build(dict(backbone="test_efficientnet", image_size=32), AdapterTuning(dim=4, scale=0.5, placement=SequentialPlacement()))
    assert model.method.site_names == blocks and len(blocks) > 3
    head = {f"backbone.classifier.{leaf}" for leaf in ("weight", "bias")}
    assert set(model.task_parameter_names()) == _adapter_names(blocks) | head
    plain = timm.create_model("test_efficientnet", num_classes=3).eval()
    plain.load_state_dict({k.replace(".inner", ""): v for k, v in model.backbone.state_dict().items() if ".adapter." not in k})
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain(x), atol=0, rtol=0)  # zero up-projection: the plain model
        wrapped = model.backbone.get_submodule(blocks[1])
        torch.nn.init.normal_(wrapped.adapter.up.weight, std=0.5)
        seen = {}
        handle = wrapped.register_forward_pre_hook(lambda module, inputs: seen.update(features=inputs[0]))
        model(x)
        handle.remove()
        features = seen["features"]  # (B, C, H, W) into the block
        y = plain.get_submodule(blocks[1])(features)
        down, up = wrapped.adapter.down, wrapped.adapter.up
        hidden = torch.relu(torch.einsum("bchw,dc->bdhw", y, down.weight) + down.bias[:, None, None])
        by_hand = y + 0.5 * (torch.einsum("bdhw,cd->bchw", hidden, up.weight) + up.bias[:, None, None])
        # float32: a 1x1 projection over <= 64 channels, eps 1.2e-7 x 64 x |y| ~ 1e-5
        torch.testing.assert_close(wrapped(features), by_hand, atol=1e-5, rtol=1e-5)
        assert not torch.equal(model(x), plain(x))
    with pytest.raises(ConfigError, match="SequentialPlacement"):
        build(dict(backbone="test_efficientnet", image_size=32), AdapterTuning(placement=ParallelPlacement()))


def test_ssf_on_efficientnet_family_blocks_sits_after_every_batchnorm():
    """SSF on a ConvNet: per-channel scale and shift after every BN affine (the bias-free conv into a BN needs none)."""
    model = build(dict(backbone="test_efficientnet", image_size=32), SSFTuning())
    norms = [n for n, m in timm.create_model("test_efficientnet").named_modules() if isinstance(m, nn.BatchNorm2d)]
    on_main_path = {s for s in model.method.site_names if ".se." not in s}
    assert on_main_path == {f"{n}.drop" for n in norms}  # BatchNormAct2d: between the affine and the activation


def test_low_bit_adapter_follows_the_papers_layout():
    adapter = Adapter(192, AdapterConfig(dim=8, bias=False, quantizer=NormalQuantile(1)))
    assert adapter.down.bias is None and adapter.up.bias is None and isinstance(adapter.act, nn.ReLU)
    assert adapter.up.weight.abs().max() <= 0.002 and adapter.up.weight.std() > 0  # trunc-normal, std 0.001
    assert adapter.dropout.p == 0.1


# --- low-bit weights ------------------------------------------------------------------------------
def test_normal_codebook_by_hand():
    levels, bounds = normal_codebook(1)
    torch.testing.assert_close(levels, torch.tensor([-PHI_INV_3_4, PHI_INV_3_4]))
    assert bounds.tolist() == [0.0]
    levels, bounds = normal_codebook(2)  # fixed point: each level is the median of its cell
    cells = torch.cat([torch.tensor([-math.inf]), bounds.double(), torch.tensor([math.inf])])
    cdf = torch.special.ndtr(cells)
    torch.testing.assert_close(torch.special.ndtr(levels.double()), (cdf[1:] + cdf[:-1]) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(levels, -levels.flip(0))


def test_normal_quantile_1bit_weights_by_hand():
    layer = QuantLinear(192, 8, NormalQuantile(1), bias=False)
    w = layer.weight.detach()
    z = (w - w.mean()) / (w.std() + 1e-5)
    expected = torch.where(z > 0, PHI_INV_3_4, -PHI_INV_3_4) * w.std() + w.mean()
    torch.testing.assert_close(layer.quantized_weight().detach(), expected)
    entry = layer.pack()
    assert entry["codes"].numel() == 192 * 8 // 8 and set(entry) == {"bits", "shape", "codes", "mean", "std"}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_normal_quantile_error_matches_the_gaussian_distortion(bits):
    """On a Gaussian 8x192 weight the relative error is the codebook's RMS distortion on N(0, 1)."""
    levels, bounds = normal_codebook(bits)
    z = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    density = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    distortion = (((z - levels.double()[torch.bucketize(z, bounds.double())]) ** 2 * density).sum() * (z[1] - z[0])).sqrt()
    weight = torch.randn(8, 192, generator=torch.Generator().manual_seed(0))
    # 1536 samples: the sampled RMS error is within ~0.02 of the integral (seen 0.004-0.016 over seeds)
    assert abs(relative_error(NormalQuantile(bits), weight) - float(distortion)) < 0.025
    if bits == 2:  # the per-row uniform grid spends levels on each row's max: clearly worse at 2 bits
        assert relative_error(UniformGrid(bits), weight) > float(distortion) + 0.1


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("learned", [False, True])
def test_uniform_grid_weights_lie_on_the_grid(bits, learned):
    quantizer = UniformGrid(bits, learned_step=learned)
    layer = QuantLinear(64, 16, quantizer)
    if layer.step_gain is not None:
        torch.nn.init.uniform_(layer.step_gain, 0.5, 1.5)
    weight = layer.quantized_weight().detach()
    step = quantizer.step(layer).detach()
    levels = weight / step[:, None] - 0.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # on the (code + 0.5) * step grid
    lo, hi = quantizer.code_range
    assert levels.round().min() >= lo and levels.round().max() <= hi
    assert max(len(row.unique()) for row in weight) <= 2**bits
    if bits == 1 and not learned:  # binary weights = sign(w) * mean|w| per row
        expected = layer.weight.sign() * layer.weight.abs().mean(dim=1, keepdim=True)
        torch.testing.assert_close(weight, expected)
    entry = layer.pack()
    assert entry["codes"].dtype == torch.uint8 and entry["codes"].numel() == math.ceil(64 * 16 * bits / 8)
    codes, _ = quantizer.encode(layer)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()).view(codes.shape), codes)


@pytest.mark.parametrize("quantizer", [NormalQuantile(1), UniformGrid(1, learned_step=True)], ids=["normal", "uniform-learned"])
def test_low_bit_straight_through_gradients(quantizer):
    layer = QuantLinear(8, 4, quantizer)
    layer(torch.randn(5, 8)).square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0
    if getattr(layer, "step_gain", None) is not None:
        assert layer.step_gain.grad.abs().sum() > 0


def test_task_storage_bytes_counts_stated_bits():
    adapter = Adapter(192, AdapterConfig(dim=8, bias=False, quantizer=NormalQuantile(1)))
    assert task_storage_bytes(adapter) == 2 * (192 * 8 // 8 + 2 * 4)  # 1-bit codes + fp32 mean and std per tensor
    uniform = Adapter(192, AdapterConfig(dim=8, quantizer=UniformGrid(1)))
    # weights: 2 * 192*8 values at 1 bit; fp32 step per output row (8 + 192); fp32 biases (8 + 192)
    assert task_storage_bytes(uniform) == 2 * (192 * 8 // 8) + (8 + 192) * 4 + (8 + 192) * 4
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
    "method",
    [
        SSFTuning(),
        AdapterTuning(bias=False, quantizer=NormalQuantile(1)),
        AdapterTuning(placement=SequentialPlacement(), quantizer=UniformGrid(3, learned_step=True)),
        SideTuning(dim=8, taps=2),
        LinearProbe(),
        FullFineTune(),
    ],
    ids=["ssf", "adapter-1bit-normal", "adapter-3bit-uniform-learned", "side", "linear_probe", "full"],
)
def test_task_file_round_trip(tmp_path, backbone_checkpoint, method):
    ckpt, pretrained = backbone_checkpoint
    model = build(VIT, method, init_checkpoint=ckpt)
    proj = model.backbone.patch_embed.proj
    assert torch.equal(proj.inner.weight if isinstance(proj, SSF) else proj.weight, pretrained.patch_embed.proj.weight)
    with torch.no_grad():  # stand-in for training: move every task parameter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    size = model.export_task_file(tmp_path / "task.pt")
    saved = torch.load(tmp_path / "task.pt", weights_only=True)
    if not isinstance(method, FullFineTune):  # only task parameters, never the 1M-parameter backbone
        assert not any(k.startswith("backbone.blocks") and "adapter" not in k and "ssf" not in k for k in saved["params"])
        assert size < 200_000
    reloaded = load_task_file(tmp_path / "task.pt")
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x), atol=1e-6, rtol=1e-6)
    quantizer = getattr(method, "quantizer", None)
    if quantizer is not None:
        entry = next(iter(saved["quantized"].values()))
        assert entry["bits"] == quantizer.bits
        assert entry["codes"].numel() == math.ceil(math.prod(entry["shape"]) * quantizer.bits / 8)


def test_task_file_needs_the_backbone(tmp_path):
    model = build(VIT, SSFTuning())
    model.export_task_file(tmp_path / "task.pt")
    with pytest.raises(ConfigError, match="init_checkpoint"):
        load_task_file(tmp_path / "task.pt")


def test_tool_user_errors_reach_the_cli_error_path_as_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="task file .* does not exist"):
        peft_main(["load", "--task", str(tmp_path / "missing.pt")])
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "resnet18"}}, tmp_path / "plain.ckpt")
    with pytest.raises(ConfigError, match="not a PEFT checkpoint"):
        peft_main(["export", "--checkpoint", str(tmp_path / "plain.ckpt"), "--out", str(tmp_path / "task.pt")])


# --- configs --------------------------------------------------------------------------------------
OVERLAYS = ["ssf", "linear_probe", "full", "adapter", "adapter_1bit", "side", "bitfit"]
EXPECTED = {"ssf": SSFTuning, "linear_probe": LinearProbe, "full": FullFineTune, "adapter": AdapterTuning,
            "adapter_1bit": AdapterTuning, "side": SideTuning, "bitfit": BitFit}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_peft_yaml_instantiates_on_the_base(tmp_path, beton_cache, overlay):
    for layers in (["peft/base.yaml", f"peft/{overlay}.yaml"], [f"peft/{overlay}.yaml"]):
        args = cli_args(tmp_path, beton_cache, model=layers[0])[1:]
        if len(layers) == 2:
            args += ["--config", str(CONFIGS / layers[1])]
        else:  # an overlay alone names no backbone (and no init_checkpoint to read one from)
            args += ["--model.init_args.backbone", "vit_tiny_patch16_224"]
        args += ["--data.init_args.train_limit", "64", "--data.init_args.val_limit", "64"]
        cli = VisionlabCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, run=False, args=args)
        assert type(cli.model.method) is EXPECTED[overlay]
        if len(layers) == 2:
            assert cli.model.hparams.backbone_kwargs == {"patch_size": 4}  # from the base, stated once
    if overlay == "adapter_1bit":
        assert isinstance(cli.model.method.quantizer, NormalQuantile) and cli.model.method.quantizer.bits == 1


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
    again = build(VIT, AdapterTuning(), init_checkpoint=str(checkpoint))
    assert torch.equal(again.backbone.blocks[0].inner.attn.qkv.weight, trained.backbone.blocks[0].attn.qkv.inner.weight)
