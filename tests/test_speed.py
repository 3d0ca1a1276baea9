"""Speed switches (channels_last, torch.compile of the network, activation checkpointing) and the throughput meter."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
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


def test_throughput_logs_lightnings_rates_and_the_networks_flops(tmp_path):
    module = tiny_module("test_resnet")
    pixels = fashion_tensors(1).tensors[0][0].numel()
    module.probe = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(pixels, 5, bias=False))  # FLOPs by hand
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[Throughput(window_size=2, attribute="probe")], limit_val_batches=0)
    trainer.fit(module, DataLoader(fashion_tensors(128), batch_size=32))
    # a (32, P) x (P, 5) matmul forward is 2*32*P*5 FLOPs; backward computes only the weight's gradient (the
    # input needs none), another 2*32*P*5
    assert module.flops_per_batch == 4 * 32 * pixels * 5
    rate = trainer.logged_metrics["train/device/samples_per_sec"]
    assert rate > 0 and trainer.logged_metrics["train/device/batches_per_sec"] == pytest.approx(rate / 32)
    assert trainer.logged_metrics["train/device/flops_per_sec"] == pytest.approx(rate / 32 * module.flops_per_batch)


def test_throughput_keeps_a_modules_own_flops(tmp_path):
    module = tiny_module("test_resnet")
    module.flops_per_batch = 123
    _fit(tmp_path, module, [Throughput(window_size=2)], steps=3)
    assert module.flops_per_batch == 123
