"""Speed switches (channels_last, torch.compile of the network, activation checkpointing) and the throughput meter."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.speed import ActivationCheckpointing, ChannelsLast, CompileNetwork, Throughput
from modules.components.errors import ConfigError
from tests.test_callbacks import fashion_tensors, tiny_module


def _fit(tmp_path, module, callbacks, steps=3):
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, DataLoader(fashion_tensors(96), batch_size=32))
    return trainer


def test_channels_last_converts_conv_weights_and_keeps_the_function(tmp_path):
    torch.manual_seed(0)
    module = tiny_module("test_resnet").double()
    images = fashion_tensors(8).tensors[0].double()
    with torch.no_grad():
        expected = module.eval()(images)
    ChannelsLast().setup(None, module, "fit")
    convs = [m.weight for m in module.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    with torch.no_grad():
        torch.testing.assert_close(module(images), expected, rtol=1e-12, atol=1e-12)  # float64: layout, not maths


def test_compiled_network_keeps_checkpoint_keys_and_trains(tmp_path):
    torch.manual_seed(0)
    module = tiny_module("test_resnet")
    reference = copy.deepcopy(module)
    keys = set(module.state_dict())
    _fit(tmp_path, module, [CompileNetwork(backend="eager")], steps=2)
    _fit(tmp_path / "ref", reference, [], steps=2)
    assert set(module.state_dict()) == keys  # nn.Module.compile: no _orig_mod. prefix in checkpoints
    assert module.backbone._compiled_call_impl is not None
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[k], v, msg=k)  # the eager backend runs the same kernels


def test_compiling_a_masked_vit_needs_its_blocks_and_then_compiles_them(tmp_path):
    """MAE runs its ViT's steps one by one: compiling the whole ViT would leave training eager, so that is an
    error after the first step; ``blocks=True`` compiles each block, and MAE's step runs through them."""
    from modules.mae import MAEModule

    def mae():
        torch.manual_seed(0)
        return MAEModule("test_vit", num_classes=10, image_size=32, backbone_kwargs={"patch_size": 4, "depth": 2},
                         decoder_dim=32)

    with pytest.raises(ConfigError, match="blocks: true"):
        _fit(tmp_path, mae(), [CompileNetwork(backend="eager")], steps=2)
    graphs = []

    def counting(graph, example_inputs):  # a torch.compile backend that records what it is given, runs it eagerly
        graphs.append(graph)
        return graph.forward

    module = mae()
    _fit(tmp_path, module, [CompileNetwork(backend=counting, blocks=True)], steps=2)
    assert graphs and all(block._compiled_call_impl is not None for block in module.backbone.blocks)
    with pytest.raises(ConfigError, match="no 'blocks'"):
        CompileNetwork(blocks=True).setup(None, tiny_module("test_resnet"), "fit")
    with pytest.raises(ConfigError, match="model.image_encoder"):
        CompileNetwork(attribute="model.missing").setup(None, tiny_module("test_resnet"), "fit")


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny_module("vit_tiny_patch16_224")
    checkpointed = copy.deepcopy(plain)
    ActivationCheckpointing().setup(None, checkpointed, "fit")
    assert checkpointed.backbone.grad_checkpointing and not plain.backbone.grad_checkpointing
    images = fashion_tensors(4).tensors[0]
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(1)
        model(images).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    with pytest.raises(ConfigError, match="set_grad_checkpointing"):
        ActivationCheckpointing(attribute="train_metrics").setup(None, plain, "fit")


def test_throughput_counts_images_after_warmup(tmp_path, capsys):
    meter = Throughput(warmup_steps=1)
    trainer = _fit(tmp_path, tiny_module("test_resnet"), [meter], steps=3)
    assert meter.images == 2 * 32 and meter.seconds > 0
    assert trainer.callback_metrics["train/images_per_sec"] == pytest.approx(meter.images / meter.seconds)
    with pytest.raises(ConfigError, match="no network 'denoiser'"):
        ChannelsLast(attribute="denoiser").setup(None, tiny_module("test_resnet"), "fit")
