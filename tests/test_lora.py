"""LoRA and DoRA: layers against hand-written formulas, merge, target patterns, task files and the peft tool."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from app.peft_tool import main as peft_main
from modules.components.errors import ConfigError
from modules.components.peft.lora import LoRALayer, channel_norm, lora_sites, merge_lora
from modules.components.peft.methods import DoRATuning, LoRATuning, build_method
from modules.components.transfer import unwrap_state_dict
from modules.peft import PEFTModule, load_task_file

VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 8, "depth": 2}, image_size=32)
VIT_TIMM = dict(img_size=32, patch_size=8, depth=2)
CNN = dict(backbone="test_resnet", image_size=32)  # 3x3 and 1x1 convs, a bias-free conv before each BatchNorm
VIT_TARGETS = ["qkv", "attn.proj", "fc1", "fc2"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="PEFT method")


def images(n: int = 4, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


def perturb(model: nn.Module, std: float = 0.1) -> None:
    """Stand-in for training: move every trainable tensor (B starts at zero, so LoRA would be a no-op)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("method_cls", [LoRATuning, DoRATuning])
@pytest.mark.parametrize("arch,targets", [(VIT, VIT_TARGETS), (CNN, None)], ids=["vit", "cnn"])
def test_merged_model_computes_what_the_wrapped_one_does_in_float64(method_cls, arch, targets):
    model = PEFTModule(**arch, num_classes=3, method=method_cls(rank=4, alpha=8.0, targets=targets)).double().eval()
    perturb(model)
    merged = model.merged_backbone()
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())  # a plain timm model
    assert any(isinstance(m, LoRALayer) for m in model.modules())  # the trained model is left as it was
    x = images(dtype=torch.float64)
    with torch.no_grad():
        wrapped, plain = model(x), merged(x)
    # float64 rounding: eps per multiply-add, summed over every layer's fan-in (<= 768) along <= 12 layers
    bound = torch.finfo(torch.float64).eps * 768 * 12 * (1 + wrapped.abs().max())
    assert (wrapped - plain).abs().max() <= bound


def test_lora_layer_is_the_formula_and_starts_as_the_plain_layer():
    linear = nn.Linear(6, 5)
    layer = LoRALayer(linear, rank=2, alpha=6.0, dropout=0.0)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), linear(x))  # B = 0
    with torch.no_grad():
        layer.lora.up.weight.normal_()
    A, B = layer.lora.down.weight, layer.lora.up.weight  # (2, 6), (5, 2)
    torch.testing.assert_close(layer(x), x @ (linear.weight + 3.0 * B @ A).T + linear.bias)  # alpha / rank = 3


def dora_reference(layer: LoRALayer, x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """DoRA by the paper's eq. 5: m * (W + s B A) / ||W + s B A||_c, the norm per output row of a linear."""
    A, B, W = layer.lora.down.weight, layer.lora.up.weight, layer.inner.weight
    direction = W + layer.scaling * B @ A  # (out, in)
    norm = direction.norm(dim=1, keepdim=True)  # (out, 1): over each output unit's fan-in
    weight = layer.lora_magnitude[:, None] * direction / (norm.detach() if detach_norm else norm)
    return x @ weight.T + layer.inner.bias


def test_dora_matches_the_paper_and_its_norm_takes_no_gradient():
    layer = LoRALayer(nn.Linear(6, 5), rank=2, alpha=2.0, dora=True)
    torch.testing.assert_close(layer.lora_magnitude.detach(), layer.inner.weight.norm(dim=1))  # m = ||W|| at start
    with torch.no_grad():
        layer.lora.up.weight.normal_()
        layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 5))
    x = torch.randn(3, 6)

    def grads(output: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad((output * torch.arange(5.0)).sum(), [layer.lora.down.weight, layer.lora.up.weight])

    torch.testing.assert_close(layer(x), dora_reference(layer, x, detach_norm=True))
    for ours, reference in zip(grads(layer(x)), grads(dora_reference(layer, x, detach_norm=True))):
        torch.testing.assert_close(ours, reference)
    undetached = grads(dora_reference(layer, x, detach_norm=False))  # what a missing detach would train with
    assert not torch.allclose(grads(layer(x))[0], undetached[0], atol=1e-4)


def test_dora_merged_conv_filters_have_the_trained_magnitudes():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = LoRALayer(conv, rank=2, alpha=2.0, dora=True).double()
    perturb(layer)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        wrapped = layer(x)
        weight = layer.merged_weight()
    # each output filter (in, k, k) of the merged conv has norm m: the magnitude/direction split is per output channel
    torch.testing.assert_close(channel_norm(weight), layer.lora_magnitude.detach())
    merged = merge_lora(nn.Sequential(layer))[0]
    assert type(merged) is nn.Conv2d and merged.stride == (2, 2)
    torch.testing.assert_close(merged(x), wrapped)


def test_targets_select_layers_by_name():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT_TIMM)
    sites = lora_sites(vit, VIT_TARGETS, exclude=("head",))
    assert sites == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert "patch_embed.proj" in lora_sites(vit, ["proj"], exclude=("head",))  # a bare name matches any suffix
    assert "head" not in lora_sites(vit, None, exclude=("head",))
    mobile = timm.create_model("mobilenetv2_050", num_classes=3)
    everything = lora_sites(mobile, None, exclude=("classifier",))
    assert "conv_stem" in everything and "blocks.1.0.conv_pw" in everything  # the kxk stem and 1x1 convs (LoCon)
    assert "blocks.1.0.conv_dw" not in everything  # depthwise: no low-rank structure
    with pytest.raises(ConfigError, match="match no linear/conv of EfficientNet.*conv_stem"):
        PEFTModule(backbone="mobilenetv2_050", num_classes=3, image_size=32, method=LoRATuning(targets=VIT_TARGETS))


def test_frozen_backbone_trainable_set_and_modes():
    model = PEFTModule(**VIT, num_classes=3, method=DoRATuning(rank=4, dropout=0.1, targets=["fc1"]))
    trainable = set(model.task_parameter_names())
    per_block = {"lora.down.weight", "lora.up.weight", "lora_magnitude"}
    assert trainable == {f"backbone.blocks.{i}.mlp.fc1.{n}" for i in range(2) for n in per_block} | {
        "backbone.head.weight", "backbone.head.bias"}
    model.train()
    fc1 = model.backbone.blocks[0].mlp.fc1
    assert fc1.lora.training and not fc1.inner.training  # the branch's dropout is live; the frozen layer stays eval


@pytest.fixture
def backbone_checkpoint(tmp_path):
    """A visionlab-style checkpoint of a 5-class ViT classifier (the pretraining run)."""
    pretrained = timm.create_model("vit_tiny_patch16_224", num_classes=5, **VIT_TIMM)
    path = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in pretrained.state_dict().items()}}, path)
    return str(path), pretrained


@pytest.mark.parametrize("method", [LoRATuning(rank=4, targets=VIT_TARGETS), DoRATuning(rank=4, targets=None)],
                         ids=["lora", "dora"])
def test_task_file_holds_adapter_weights_only_and_the_peft_tool_merges(tmp_path, backbone_checkpoint, method):
    ckpt, pretrained = backbone_checkpoint
    model = PEFTModule(**VIT, num_classes=3, method=method, init_checkpoint=ckpt)
    assert build_method(model.method.record()).record() == model.method.record()  # rebuilt from primitives
    perturb(model)
    model.export_task_file(tmp_path / "task.pt")
    saved = torch.load(tmp_path / "task.pt", weights_only=True)
    kept = {name.split(".")[-2] if name.endswith("weight") else name.split(".")[-1] for name in saved["params"]}
    assert kept <= {"down", "up", "lora_magnitude", "head", "bias"}, kept
    assert all(".lora." in n or n.endswith("lora_magnitude") or n.startswith("backbone.head.") for n in saved["params"])
    peft_main(["load", "--task", str(tmp_path / "task.pt"), "--out", str(tmp_path / "plain.pt")])
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT_TIMM).eval()
    plain.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))  # strict: plain timm names
    with torch.no_grad():
        x = images()
        torch.testing.assert_close(load_task_file(tmp_path / "task.pt")(x), model.eval()(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    # the run's state dict also serves as a backbone checkpoint: LoRA/DoRA tensors dropped, frozen weights kept
    unwrapped = unwrap_state_dict({k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    assert unwrapped.keys() == pretrained.state_dict().keys()
    assert torch.equal(unwrapped["blocks.0.attn.qkv.weight"], pretrained.blocks[0].attn.qkv.weight)
